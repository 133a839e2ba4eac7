"""`ostinato chaos`: a local fleet under a fault schedule, and the proof that it survived.

The supervisor (fleet/local.py) runs the fleet; this module adds the faults a process cannot do
to itself: a crash is a SIGKILL and a hang a SIGSTOP, sent when the island reaches the step or
round the schedule names, or at a storm's wall-clock time. The other kinds strike from inside
the islands (faults/inject.py). Afterwards every fault is matched with the guard that caught it
(island events, the fleet's guards.jsonl, the supervisor's log) into chaos.json and a table.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ostinato.config import Config, budget_of
from ostinato.goodput import read_events, summarize
from ostinato.faults.inject import FIRED_FILE, FROM_OUTSIDE
from ostinato.faults.spec import Fault, from_json, parse_faults, to_json
from ostinato.fleet.guards import read_guard_log
from ostinato.fleet.island import total_inner_steps, total_rounds
from ostinato.fleet.local import LocalFleet

console = Console(highlight=False, width=None if os.isatty(1) else 140)
RESTART_S = 10.0  # what a restart is assumed to take when a storm is checked for a quorum
MATCH_WINDOW_S = 15.0  # a detection further than this after a fault is not that fault's
# Which guard is meant to catch each kind; a detection by another one still counts.
GUARDS = {
    "crash": ("heartbeat", "process exit"),
    "hang": ("heartbeat",),
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


@dataclass
class Strike:
    """A crash or hang for the supervisor to send, and when it was sent."""

    fault: Fault
    sent_at: float | None = None
    at_step: int | None = None
    at_round: int | None = None


class ChaosFleet(LocalFleet):
    """A local fleet whose supervisor also sends the schedule's crashes and hangs."""

    def __init__(self, *args, faults: list[Fault], start: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = start
        self.strikes = [Strike(f) for f in faults if f.kind in FROM_OUTSIDE]

    def tick(self) -> None:
        super().tick()
        for strike in self.strikes:
            if strike.sent_at is None:
                self._maybe_strike(strike)

    def _maybe_strike(self, strike: Strike) -> None:
        island = self.islands.get(strike.fault.island)
        if island is None or island.done or island.process.poll() is not None:
            return
        step, round_number = last_progress(self.out / island.name)
        fault = strike.fault
        due = (
            (fault.step is not None and step is not None and step >= fault.step)
            or (
                fault.round is not None and round_number is not None and round_number >= fault.round
            )
            or (fault.at_s is not None and time.time() - self.start >= fault.at_s)
        )
        if not due:
            return
        sig = signal.SIGKILL if fault.kind == "crash" else signal.SIGSTOP
        os.kill(island.process.pid, sig)
        strike.sent_at, strike.at_step, strike.at_round = time.time(), step, round_number
        self.note(f"{fault.kind} sent", island.name, step=step, round=round_number)
        mark_fault(self.out / island.name, island.name, fault.kind, strike.sent_at)
        console.print(f"[red]chaos: {fault.kind} sent to island {island.name} at step {step}[/]")


def last_progress(run_dir: Path) -> tuple[int | None, int | None]:
    """(step, round) of the island's latest metrics line; read from the end of the file."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
            return record["step"], record.get("round")
        except (ValueError, KeyError):
            continue  # a line torn by a kill, or the start of a cut one
    return None, None


def mark_fault(run_dir: Path, island: str, kind: str, at: float) -> None:
    """The island's own events get the fault, so goodput counts its down time as down."""
    record = {
        "type": "mark",
        "island": island,
        "kind": "fault",
        "label": f"{kind} sent",
        "time": at,
    }
    run_dir.mkdir(parents=True, exist_ok=True)  # a storm may strike before the island made it
    with (run_dir / "events.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


# --- the run ------------------------------------------------------------------------------------


def parse_schedule(spec: str, names: list[str], cfg: Config) -> list[Fault]:
    """Every fault checked before anything starts, against the run's rounds and inner steps;
    storms last until the run ends."""
    if not spec.strip():
        raise ValueError("--faults is empty; give a schedule such as crash@island=b,step=40")
    kind, _ = budget_of(cfg.fleet)
    rounds = total_rounds(cfg)
    return parse_faults(
        spec,
        names,
        steps=total_inner_steps(cfg) if kind == "steps" else None,
        rounds=rounds,
        min_islands=cfg.fleet.min_islands,
        restart_s=RESTART_S,
        duration_s=24 * 3600.0,
    )


def chaos_overrides(spec: str, names: list[str], start: float) -> list[str]:
    return [
        f"faults.schedule={spec}",
        f"faults.islands={','.join(names)}",
        f"faults.start={start}",
    ]


def chaos(
    config: Path,
    out: Path,
    names: list[str],
    spec: str,
    overrides: list[str],
    per_island: dict[str, list[str]],
    compare: bool,
    cfg: Config,
) -> int:
    """Run the fleet under `spec` (and, with `compare`, the same fleet without faults first)."""
    faults = parse_schedule(spec, names, cfg)
    reference_loss = None
    if compare:
        console.print("[bold]chaos[/]: the fault-free reference fleet first")
        reference = LocalFleet(config, out / "reference", names, overrides, per_island, "none", 3)
        if reference.run() != 0:
            raise RuntimeError("the fault-free reference fleet failed; see its output above")
        reference_loss, _ = final_state(out / "reference", names)
    start = time.time()
    fleet = ChaosFleet(
        config,
        out,
        names,
        [*overrides, *chaos_overrides(spec, names, start)],
        per_island,
        "none",
        max_restarts=1000,
        faults=faults,
        start=start,
    )
    code = fleet.run()
    report = build_report(out, names, faults, fleet, start, code)
    report["reference_loss"] = reference_loss
    report["supervisor"] = [{**e, "time": round(e["time"] - start, 3)} for e in fleet.log]
    path = write_report(out, report)
    print_survival_table(report)
    console.print(f"chaos report in {path}")
    return verdict(report)


# --- the report ---------------------------------------------------------------------------------


def detections(out: Path, names: list[str], supervisor: list[dict]) -> list[dict[str, Any]]:
    """Every guard firing of the run: the fleet's, each island's own (its detect marks), and
    the supervisor's view of a process that died (as torchrun sees a rank exit)."""
    found = [
        {"time": g["time"], "guard": g["guard"], "island": g["island"], "action": g["action"]}
        for g in read_guard_log(out)
    ]
    found += [
        {"time": n["time"], "guard": "process exit", "island": n["island"], "action": "restarted"}
        for n in supervisor
        if n["what"] == "exited" and n.get("code", 0) < 0
    ]
    for name in names:
        for event in read_events(out / name):
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


def injections(out: Path, names: list[str], strikes: list[Strike]) -> list[dict[str, Any]]:
    """Each fault that struck, with its unix time: from the islands' faults.jsonl and the
    supervisor's strikes."""
    struck = []
    for name in names:
        path = out / name / FIRED_FILE
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip().endswith("}"):
                    record = json.loads(line)
                    struck.append({**record, "time": record["time"]})
    for strike in strikes:
        if strike.sent_at is not None:
            record = {**to_json(strike.fault), "time": strike.sent_at, "at_step": strike.at_step}
            struck.append({**record, "at_round": strike.at_round})
    return sorted(struck, key=lambda s: s["time"])


def first_compute_after(out: Path, island: str, after: float) -> float | None:
    spans = [
        e["start"]
        for e in read_events(out / island)
        if e.get("type") == "span" and e["kind"] == "compute" and e["start"] >= after
    ]
    return min(spans, default=None)


def waiting_of_others(out: Path, names: list[str], island: str, after: float) -> float:
    return sum(
        e["end"] - e["start"]
        for name in names
        if name != island
        for e in read_events(out / name)
        if e.get("type") == "span" and e["kind"] == "waiting" and e["start"] >= after
    )


def first_detection(found, island: str, wanted: tuple[str, ...], injected: float):
    """The detection of a fault: by the guard meant for it if it fired soon enough, else by
    the next one in `wanted` (a crash during a restart is seen by the supervisor only)."""
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
    """Seconds the fault cost: the island's time out of training for crash, hang and bitflip
    (until it trains again after its restart or heal); the others' waiting for slow and link;
    the time from the fault to its detection for nan and spike (the steps skipped or undone)."""
    kind, island, injected = fault["kind"], fault["island"], fault["time"]
    if kind in ("crash", "hang", "bitflip"):
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
    fleet: ChaosFleet,
    start: float,
    code: int,
) -> dict[str, Any]:
    found = detections(out, names, fleet.log)
    strikes = fleet.strikes
    struck = injections(out, names, strikes)
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
        console.print(f"fault-free reference loss {report['reference_loss']:.4f}")


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
