"""The survival report of a chaos run: every fault that struck matched with the guard that caught
it (the fleet's guards.jsonl, each island's detect marks), what was done and what it cost, into
chaos.json and a table. A fault counts as detected only when a guard saw it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ostinato.faults.inject import FIRED_FILE
from ostinato.faults.spec import Fault, from_json, to_json
from ostinato.fleet.guards import read_guard_log
from ostinato.goodput import read_events, summarize
from ostinato.jsonl import read_jsonl

console = Console(highlight=False, width=None if os.isatty(1) else 140)
MATCH_WINDOW_S = 15.0  # a detection further than this after a fault is not that fault's
# Which guards may catch each kind, the one meant for it first. A crash is seen by the
# coordinator's heartbeat guard (its beats stop with the process), never by the supervisor that
# sent the SIGKILL: a detection is a guard's. A stall keeps beating, so only the progress
# watchdog sees it.
GUARDS = {
    "crash": ("heartbeat",),
    "hang": ("heartbeat",),
    "stall": ("progress",),
    "nan": ("nonfinite",),
    "bitflip": ("digest", "pseudo_gradient", "rank_digest"),
    "spike": ("spike",),
    "slow": ("straggler",),
    "link": ("link",),
}
# What an island's own guards do when they fire (the fleet's guards say it in guards.jsonl).
ISLAND_ACTIONS = {
    "nonfinite": "step skipped (a streak rolls back)",
    "spike": "rolled back, data window skipped",
    "digest": "rank repaired from the majority",
}


def island_events(out: Path, island: str) -> list[dict[str, Any]]:
    """The island's events; none if it never logged any (killed before its first)."""
    return read_events(out / island) if (out / island / "events.jsonl").exists() else []


def detections(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """Every guard firing of the run: the fleet's (guards.jsonl) and each island's own (its
    detect marks). Only guards: the supervisor's knowledge of a signal it sent itself, or of a
    process exit, is not a detection."""
    found = [
        {"time": g["time"], "guard": g["guard"], "island": g["island"], "action": g["action"]}
        for g in read_guard_log(out)
    ]
    for name in names:
        for event in island_events(out, name):
            if event.get("type") == "mark" and event.get("kind") == "detect":
                guard = event["label"].removeprefix("guard ").partition(":")[0]
                action = ISLAND_ACTIONS.get(guard, "reported")
                found.append(
                    {
                        "time": event["time"],
                        "guard": guard,
                        "island": name,
                        "action": action,
                    }
                )
    return sorted(found, key=lambda d: d["time"])


def injections(
    out: Path, names: list[str], from_outside: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each fault that struck, with its unix time: from the islands' faults.jsonl and the
    supervisor's strikes (`from_outside`, ChaosFleet.struck)."""
    struck = list(from_outside)
    for name in names:
        path = out / name / FIRED_FILE
        if path.exists():
            struck += [record for record in read_jsonl(path) if "time" in record]
    return sorted(struck, key=lambda s: s["time"])


def first_compute_after(out: Path, island: str, after: float) -> float | None:
    spans = [
        e["start"]
        for e in island_events(out, island)
        if e.get("type") == "span" and e["kind"] == "compute" and e["start"] >= after
    ]
    return min(spans, default=None)


def waiting_of_others(out: Path, names: list[str], island: str, after: float) -> float:
    return sum(
        e["end"] - e["start"]
        for name in names
        if name != island
        for e in island_events(out, name)
        if e.get("type") == "span" and e["kind"] == "waiting" and e["start"] >= after
    )


def first_detection(found, island: str, wanted: tuple[str, ...], injected: float):
    """The detection of a fault: by the guard meant for it if it fired soon enough, else by
    the next one in `wanted`."""
    for guard in wanted:
        for d in found:
            soon = injected - 0.5 <= d["time"] <= injected + MATCH_WINDOW_S
            if d["island"] == island and d["guard"] == guard and soon:
                return d
    return None


def account_fault(out, names, fault, found, start) -> dict[str, Any]:
    """One fault's row: when it struck, which guard caught it, what was done, what it cost."""
    injected = fault["time"]
    match = first_detection(found, fault["island"], GUARDS[fault["kind"]], injected)
    if match is not None:
        found.remove(match)  # one detection answers one fault
    row = {
        "kind": fault["kind"],
        "island": fault["island"],
        "step": fault.get("at_step"),
        "round": fault.get("at_round"),
        "injected_at": round(injected - start, 3),
        "detected_at": None if match is None else round(match["time"] - start, 3),
        "guard": None if match is None else match["guard"],
        "action": None if match is None else match["action"],
        "seconds_lost": None,
    }
    if match is not None:
        row["seconds_lost"] = round(cost(out, names, fault, match["time"]), 3)
    return row


def cost(out: Path, names: list[str], fault: dict[str, Any], detected: float) -> float:
    """Seconds the fault cost: the island's time out of training for crash, hang, stall and
    bitflip (until it trains again after its restart or heal); the others' waiting for slow and
    link; the time from the fault to its detection for nan and spike (the steps skipped or
    undone)."""
    kind, island, injected = fault["kind"], fault["island"], fault["time"]
    if kind in ("crash", "hang", "stall", "bitflip"):
        back = first_compute_after(out, island, detected)
        return (back if back is not None else detected) - injected
    if kind in ("slow", "link"):
        return waiting_of_others(out, names, island, injected)
    return max(0.0, detected - injected)


def never_struck(faults: list[Fault], struck: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scheduled faults (not storm ones, which end with the run) whose moment never came."""
    done = {json.dumps(to_json(f_from(s)), sort_keys=True) for s in struck}
    return [
        {
            **to_json(f),
            "injected_at": None,
            "detected_at": None,
            "guard": None,
            "action": "never injected: the run ended before its moment",
            "seconds_lost": None,
            "step": f.step,
            "round": f.round,
        }
        for f in faults
        if f.at_s is None and json.dumps(to_json(f), sort_keys=True) not in done
    ]


def f_from(record: dict[str, Any]) -> Fault:
    keys = ("kind", "island", "step", "round", "at_s", "params")
    return from_json({k: record.get(k) for k in keys})


def final_state(out: Path, names: list[str]) -> tuple[float | None, bool]:
    """The fleet's validation loss (every island holds the same final global parameters) and
    whether they really all do."""
    summaries = []
    for name in names:
        path = out / name / "summary.json"
        if path.exists():
            summaries.append(json.loads(path.read_text()))
    digests = {s.get("digest") for s in summaries}
    identical = len(summaries) == len(names) and len(digests) == 1
    loss = summaries[0].get("val_loss") if summaries else None
    return loss, identical


def build_report(
    out: Path,
    names: list[str],
    faults: list[Fault],
    from_outside: list[dict[str, Any]],
    start: float,
    code: int,
) -> dict[str, Any]:
    """chaos.json: every fault (struck, or never struck) with the guard that caught it."""
    found = detections(out, names)
    struck = injections(out, names, from_outside)
    rows = [account_fault(out, names, f, found, start) for f in struck]
    rows += never_struck(faults, struck)
    goodput = summarize(out, f"chaos {out.name}")
    final_loss, identical = final_state(out, names)
    return {
        "faults": rows,
        "goodput": goodput.goodput,
        "goodput_seconds": goodput.seconds,
        "final_loss": final_loss,
        "parameters_identical": identical,
        "fleet_exit_code": code,
        "undetected": sum(r["detected_at"] is None for r in rows),
        "faults_scheduled": len(faults),
    }


def print_survival_table(report: dict[str, Any]) -> None:
    table = Table(title="survival table", title_justify="left")
    for column in (
        "fault",
        "island",
        "at",
        "injected s",
        "detected s",
        "guard",
        "action",
        "lost s",
    ):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for row in report["faults"]:
        moment = f"step {row['step']}" if row["step"] is not None else f"round {row['round']}"
        injected = "-" if row["injected_at"] is None else f"{row['injected_at']:.1f}"
        detected = (
            "[red]UNDETECTED[/]" if row["detected_at"] is None else f"{row['detected_at']:.1f}"
        )
        lost = "-" if row["seconds_lost"] is None else f"{row['seconds_lost']:.1f}"
        table.add_row(
            row["kind"],
            row["island"],
            moment,
            injected,
            detected,
            row["guard"] or "-",
            row["action"] or "-",
            lost,
        )
    console.print(table)
    console.print(
        f"goodput {report['goodput']:.1%}; final validation loss {report['final_loss']}; "
        f"islands end with identical parameters: {report['parameters_identical']}"
    )
    if report.get("reference_loss") is not None:
        seeds = [v for v in report.get("reference_losses", {}).values() if v is not None]
        spread = f" ({len(seeds)} seeds: {min(seeds):.4f}-{max(seeds):.4f})" if seeds else ""
        console.print(f"fault-free reference loss {report['reference_loss']:.4f}{spread}")


def verdict(report: dict[str, Any]) -> int:
    """0 when the fleet finished, every fault was detected and the survivors agree."""
    ok = (
        report["fleet_exit_code"] == 0
        and report["undetected"] == 0
        and report["parameters_identical"]
        and bool(report["faults"])
    )
    return 0 if ok else 1


def write_report(out: Path, report: dict[str, Any]) -> Path:
    path = out / "chaos.json"
    path.write_text(json.dumps(report, indent=1))
    return path
