"""Goodput of a 3-island fleet under random fault storms, against the fault-free reference.

For each storm (mean time between faults across the fleet: 60 s, then 20 s) this runs
`ostinato chaos --compare`: first the fleet without faults, then the same fleet under
`storm:mtbf=...` (crash = SIGKILL, hang = SIGSTOP, bitflip = a high exponent bit of a parameter).
It prints, per storm: the fleet's goodput, the final validation loss against the reference, and
per fault kind the seconds from fault to detection and to recovery (the island training again);
for a crash also the seconds the OTHER islands lost to it, read from their waiting spans. Then
a table of each measure against the target of issue 4.

Only the first storm runs `--compare`; the later storms are measured against its fault-free
fleet (the same islands, recipe and rounds), which saves one reference run per storm.

Both fleets run on a time budget (--round-s seconds of inner steps per round, minutes*60/round_s
rounds), so a storm lasts about --minutes. A watchdog kills a run whose fleet commits no round
for --stall-s seconds and reports it as stalled rather than waiting forever.

Usage: .venv/bin/python bench/chaos_storm.py [--minutes 4] [--mtbf 60 20] [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ostinato.faults.spec import parse_faults
from ostinato.faults.survival import final_state
from ostinato.goodput import read_events, summarize

ROOT = Path(__file__).resolve().parents[1]
ISLANDS = ("a", "b", "c")
# The model: the demo recipe (dim 128, 4 layers, vocab 1024) on a smaller corpus so that start-up
# and restarts are quick; one thread per island, no generation at the end (only the val loss).
MODEL = [
    "data.problems=2000",
    "train.threads=1",
    "train.eval_problems=0",
    "train.samples=0",
]
TARGETS = {  # issue 4
    "goodput_60s": 0.90,  # at least
    "loss_ratio": 1.01,  # final / reference, at most
    "crash_others_s": 10.0,  # at most
    "hang_detect_s": 30.0,  # at most
}


@dataclass
class Run:
    """One finished (or stalled) chaos run."""

    name: str
    out: Path
    command: list[str]
    exit_code: int | None
    stalled: str | None  # None, or which fleet stalled and when
    wall_s: float
    report: dict = field(default_factory=dict)  # chaos.json, when written


# --- running ------------------------------------------------------------------------------------


def chaos_command(out: Path, faults: str, args, compare: bool, extra=(), islands=3) -> list[str]:
    rounds = max(1, round(args.minutes * 60 / args.round_s))
    command = [sys.executable, "-m", "ostinato", "chaos", "--config", str(args.config)]
    command += ["--islands", str(islands), "--out", str(out), "--faults", faults]
    command += ["--compare"] if compare else []
    command += [f"--{o}" for o in MODEL]
    command += [f"--fleet.budget=seconds:{args.round_s:g}", f"--fleet.rounds={rounds}"]
    return command + list(extra)


def storm_spec(mtbf: float, seed: int, minutes: float) -> str:
    return f"storm:mtbf={mtbf:g}s,seed={seed},duration={minutes * 60:g}s"


def pick_seed(mtbf: float, minutes: float, first: int, warmup_s: float, islands=ISLANDS) -> int:
    """The first seed from `first` whose storm holds at least one crash and one hang, so that a
    short storm measures both, and strikes nothing in the first warmup_s seconds, which the
    islands spend starting up (the storm's clock starts with the supervisor)."""
    for seed in range(first, first + 1000):
        faults = parse_faults(storm_spec(mtbf, seed, minutes), list(islands), restart_s=10.0)
        kinds = {f.kind for f in faults}
        if {"crash", "hang"} <= kinds and min(f.at_s for f in faults) >= warmup_s:
            return seed
    raise ValueError(f"no seed in {first}..{first + 999} gives a crash and a hang")


def last_progress(out: Path) -> float:
    """When either fleet (reference or chaos) last committed a round, or the run dir appeared."""
    paths = [out, out / "rounds.jsonl", out / "reference" / "rounds.jsonl"]
    return max(p.stat().st_mtime for p in paths if p.exists())


def run_watched(name: str, out: Path, command: list[str], stall_s: float) -> Run:
    """Run one chaos command, its output in OUT.log; kill its whole process group (supervisor,
    coordinator, islands) when no round commits for stall_s seconds."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log_path = out.with_suffix(".log")
    print(f"[{name}] {' '.join(command)}\n[{name}] log: {log_path}", flush=True)
    start = time.time()
    stalled = None
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while process.poll() is None:
            time.sleep(5)
            quiet = time.time() - last_progress(out)
            if quiet > stall_s and process.poll() is None:
                phase = "chaos" if (out / "a").exists() else "reference"
                stalled = f"{phase} fleet committed no round for {quiet:.0f} s"
                stop_group(process)
    run = Run(name, out, command, process.returncode, stalled, time.time() - start)
    if (out / "chaos.json").exists():
        run.report = json.loads((out / "chaos.json").read_text())
    elif stalled and (out / "a").exists():  # account what the stopped fleet did, as it would have
        summarize(out, f"{name} (stopped by the watchdog)")
    print(f"[{name}] exit {run.exit_code} after {run.wall_s:.0f} s; stalled: {stalled}", flush=True)
    return run


def run_chaos(name: str, out: Path, command: list[str], stall_s: float, retries: int) -> Run:
    """run_watched, again when the fault-free reference fleet failed: on an overloaded box an
    island of the reference can miss its heartbeats, get killed, and end the whole run (the
    reference runs without restarts). Each failed try's log is kept as OUT.tryN.log."""
    for attempt in range(1, retries + 2):
        run = run_watched(name, out, command, stall_s)
        log_path = out.with_suffix(".log")
        if run.report or "reference fleet failed" not in log_path.read_text():
            break
        shutil.copy(log_path, out.with_suffix(f".try{attempt}.log"))
        print(f"[{name}] the fault-free reference fleet failed (try {attempt})", flush=True)
    return run


def reused(name: str, out: Path, command: list[str]) -> Run:
    """A run an earlier invocation finished (--reuse): measured again, not run again."""
    print(f"[{name}] reusing the finished run in {out}", flush=True)
    run = Run(name, out, command, exit_code=None, stalled=None, wall_s=0.0)
    run.report = json.loads((out / "chaos.json").read_text())
    # accounted again by this checkout's goodput code, which may be newer than the run
    run.report["goodput"] = summarize(out, f"{name} (accounted again)").goodput
    return run


def stop_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    else:  # the supervisor is gone; its islands and coordinator may not be
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- measuring ----------------------------------------------------------------------------------


def spans(run_dir: Path, kind: str) -> list[tuple[float, float]]:
    return [
        (e["start"], e["end"])
        for e in read_events(run_dir)
        if e.get("type") == "span" and e["kind"] == kind
    ]


def overlap(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in intervals)


def waiting_rate(fleet_dir: Path, island: str) -> float:
    """Seconds of waiting per second of the island's life in a run: its usual waiting."""
    events = read_events(fleet_dir / island)
    times = [t for e in events for t in ((e["start"], e["end"]) if "start" in e else (e["time"],))]
    life = max(times) - min(times)
    return overlap(spans(fleet_dir / island, "waiting"), -1e18, 1e18) / life if life else 0.0


def strikes(out: Path, label: str) -> list[tuple[str, float]]:
    """(island, unix time) of every fault the supervisor sent, from the islands' fault marks."""
    found = []
    for name in ISLANDS:
        for e in read_events(out / name):
            if e.get("type") == "mark" and e.get("label") == label:
                found.append((name, e["time"]))
    return sorted(found, key=lambda s: s[1])


def back_as_member(out: Path, island: str, after: float) -> float | None:
    """Unix time of the first round committed after `after` with the island among its members."""
    path = out / "rounds.jsonl"
    rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [r["time"] for r in rounds if r["time"] > after and island in r["members"]]
    return min(times, default=None)


def crash_cost_to_others(out: Path, baseline: dict[str, float]) -> list[dict]:
    """For each crash: the other islands' waiting from the kill until the crashed island is a
    member of a committed round again, raw and beyond their usual waiting (the reference
    fleet's waiting rate over the same length of time); the mean over the other islands."""
    rows = []
    end_of_run = max(e.get("end", e.get("time")) for e in read_events(out))
    for island, killed in strikes(out, "crash sent"):
        back = back_as_member(out, island, killed) or end_of_run
        others = [n for n in ISLANDS if n != island]
        raw = [overlap(spans(out / n, "waiting"), killed, back) for n in others]
        extra = [w - baseline[n] * (back - killed) for w, n in zip(raw, others, strict=True)]
        rows.append(
            {
                "island": island,
                "window_s": back - killed,
                "others_waiting_s": statistics.fmean(raw),
                "others_extra_s": max(0.0, statistics.fmean(extra)),
            }
        )
    return rows


def by_kind(report: dict) -> dict[str, dict]:
    """Per fault kind: how many struck and were detected, median detection and recovery."""
    kinds: dict[str, dict] = {}
    for row in report.get("faults", []):
        if row["injected_at"] is None:
            continue
        entry = kinds.setdefault(row["kind"], {"n": 0, "detected": 0, "detect": [], "lost": []})
        entry["n"] += 1
        if row["detected_at"] is not None:
            entry["detected"] += 1
            entry["detect"].append(row["detected_at"] - row["injected_at"])
        if row["seconds_lost"] is not None:
            entry["lost"].append(row["seconds_lost"])
    return kinds


def tokens_committed(fleet_dir: Path) -> int | None:
    """Tokens of the members of every committed round: the training the fleet kept."""
    path = fleet_dir / "rounds.jsonl"
    if not path.exists():
        return None
    rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(sum(r["tokens"].get(m, 0) for m in r["members"]) for r in rounds)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure(run: Run, reference: Path) -> dict:
    """Everything the tables need from one run, against the fault-free fleet in `reference`."""
    report = run.report
    result = {"goodput": report.get("goodput"), "final": report.get("final_loss")}
    result["reference"] = report.get("reference_loss")
    if result["reference"] is None and (reference / "a").exists():
        result["reference"] = final_state(reference, list(ISLANDS))[0]
    result["identical"] = report.get("parameters_identical")
    result["undetected"] = report.get("undetected")
    result["kinds"] = by_kind(report)
    result["tokens"] = (tokens_committed(run.out), tokens_committed(reference))
    crashes = []
    if report and (reference / "a").exists():
        baseline = {n: waiting_rate(reference, n) for n in ISLANDS}
        crashes = crash_cost_to_others(run.out, baseline)
    result["crashes"] = crashes
    return result


# --- printing -----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_run(run: Run, result: dict) -> None:
    print(f"\n## {run.name}: {run.wall_s:.0f} s, exit {run.exit_code}, stalled: {run.stalled}")
    if not run.report:
        print("no chaos.json: the run did not finish")
        return
    loss_ratio = ratio(result["final"], result["reference"])
    print(
        f"goodput {fmt(result['goodput'], '.1%')}; final val loss {fmt(result['final'], '.4f')}"
        f" vs reference {fmt(result['reference'], '.4f')} (ratio {fmt(loss_ratio, '.4f')}); "
        f"undetected {result['undetected']}; identical parameters {result['identical']}"
    )
    storm_tokens, reference_tokens = result["tokens"]
    print(f"tokens committed: {storm_tokens} under the storm, {reference_tokens} in the reference")
    print("| kind | struck | detected | median s to detection | median s to recovery |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, e in sorted(result["kinds"].items()):
        print(
            f"| {kind} | {e['n']} | {e['detected']} | {fmt(median(e['detect']))} "
            f"| {fmt(median(e['lost']))} |"
        )
    crashes = result["crashes"]
    if crashes:
        print("crashes, the others' waiting until the crashed island is a member again:")
        for c in crashes:
            print(
                f"  {c['island']}: window {c['window_s']:.1f} s, waiting {c['others_waiting_s']:.1f}"
                f" s, beyond usual {c['others_extra_s']:.1f} s"
            )


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def target_rows(name: str, mtbf: float, result: dict) -> list[tuple]:
    """(measure, measured, target, ratio measured/target, met) for one storm."""
    rows = []
    goodput_target = TARGETS["goodput_60s"] if mtbf >= 60 else None  # no target at 20 s
    rows.append(("goodput", result["goodput"], goodput_target, ">="))
    loss_ratio = ratio(result["final"], result["reference"])
    rows.append(("final / reference loss", loss_ratio, TARGETS["loss_ratio"], "<="))
    extra = median([c["others_extra_s"] for c in result["crashes"]])
    rows.append(("crash: others' lost s (median)", extra, TARGETS["crash_others_s"], "<="))
    hang = median(result["kinds"].get("hang", {}).get("detect", []))
    rows.append(("hang: s to detection (median)", hang, TARGETS["hang_detect_s"], "<="))
    return [(name, *row) for row in rows]


def print_targets(rows: list[tuple]) -> None:
    print("\n| storm | measure | measured | target | measured / target | met |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for storm, what, value, target, sense in rows:
        r = ratio(value, target)
        if value is None or target is None:
            met = "-"
        else:
            met = "yes" if (value >= target if sense == ">=" else value <= target) else "MISSED"
        spec = ".1%" if what == "goodput" else ".4f" if "loss" in what else ".1f"
        target_text = "-" if target is None else f"{sense} {format(target, spec)}"
        print(
            f"| {storm} | {what} | {fmt(value, spec)} | {target_text} | {fmt(r, '.2f')} | {met} |"
        )


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="length of each storm")
    parser.add_argument("--mtbf", type=float, nargs="+", default=[60.0, 20.0], help="seconds")
    parser.add_argument("--seed", type=int, default=1, help="first storm seed to try")
    parser.add_argument("--warmup-s", type=float, default=45.0, help="no fault before this")
    parser.add_argument("--round-s", type=float, default=10.0, help="time budget of a round")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "chaos_storm")
    parser.add_argument("--stall-s", type=float, default=180.0, help="watchdog: no round for")
    parser.add_argument("--retries", type=int, default=1, help="when the reference fails")
    parser.add_argument("--reuse", action="store_true", help="measure finished runs in --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    reference = None  # the first storm's fault-free fleet, shared by the later storms
    for mtbf in args.mtbf:
        seed = pick_seed(mtbf, args.minutes, args.seed, args.warmup_s)
        spec = storm_spec(mtbf, seed, args.minutes)
        schedule = parse_faults(spec, list(ISLANDS), restart_s=10.0)
        print(f"\nstorm {spec}: {len(schedule)} faults scheduled:", flush=True)
        print("  " + ", ".join(f"{f.kind}@{f.island}:{f.at_s:.0f}s" for f in schedule))
        name = f"storm-mtbf{mtbf:g}"
        out = args.out / name
        command = chaos_command(out, spec, args, compare=reference is None)
        if args.reuse and (out / "chaos.json").exists():
            run = reused(name, out, command)
        else:
            run = run_chaos(name, out, command, args.stall_s, args.retries)
        reference = reference or out / "reference"
        result = measure(run, reference)
        print_run(run, result)
        rows += target_rows(name, mtbf, result)
    print_targets(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
