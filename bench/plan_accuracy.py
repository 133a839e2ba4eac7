"""How well `ostinato plan` predicts: measured chaos runs, and two published large runs.

Part 1: five `ostinato chaos` runs of a 3-island fleet (different storms and link shapes), each
followed by `ostinato plan --calibrate DIR --json`, which fits the machine from the run and
predicts the run back. Printed: the goodput the run measured (DIR/goodput.json: compute seconds
over island-seconds) against the goodput predicted, in percentage points (target: within 5 pp),
plus wall time and interruptions, and where the measured run lost its time, so that a miss can
be traced to what the fit left out. Earlier chaos dirs (by default those of
bench/chaos_storm.py, when present) are calibrated as extra rows with --also.

Part 2: `ostinato plan --preset llama3-405b --json` and `--preset torchft-l40s --json` against
the figures their sources publish (shared/FACTS.md; target: within 10%).

Usage: .venv/bin/python bench/plan_accuracy.py [--minutes 3] [--out DIR] [--also DIR ...] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from chaos_storm import ROOT, chaos_command, pick_seed, run_watched, storm_spec

from ostinato.goodput import summarize


@dataclass(frozen=True)
class Scenario:
    name: str
    mtbf: float  # storm: mean seconds between faults across the fleet
    extra_faults: str = ""  # appended to the storm, e.g. a slow island
    overrides: tuple[str, ...] = ()  # more --section.key=value for every island


SCENARIOS = (
    Scenario("storm20", 20),
    Scenario("storm40", 40),
    Scenario("storm80", 80),
    Scenario("storm40-link", 40, overrides=("--fleet.link=latency=50ms,bandwidth=100mbit",)),
    Scenario("storm40-slow-b", 40, extra_faults="slow@island=b,factor=2"),
)
TARGET_PP = 5.0
TARGET_PRESET = 0.10
# Published figures (shared/FACTS.md). "at least": the source gives a lower bound.
PUBLISHED = {
    "llama3-405b": [
        ("interruptions (unexpected)", "interruptions", 419, "arXiv 2407.21783 3.3.4"),
        ("time to train (h)", "time_to_train_hours", 54 * 24, "54-day window, same source"),
        ("goodput (at least)", "goodput", 0.90, "'over 90% effective training time'"),
    ],
    "torchft-l40s": [
        ("interruptions (failures)", "interruptions", 1100, "PyTorch blog, ~1,100 failures"),
        ("share of steps committed", "rounds_committed", 0.823, "blog: 82.3%"),
        ("goodput (training efficiency)", "goodput", 0.812, "blog: 81.2%"),
    ],
}
LOSSES = ("exchange", "waiting", "checkpoint", "recovery", "discarded", "down", "idle")


def ostinato(*args: str) -> dict:
    """Run `python -m ostinato ...` and parse its --json answer."""
    command = [sys.executable, "-m", "ostinato", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout)


# --- part 1: calibrated chaos runs ---------------------------------------------------------------


def run_scenario(scenario: Scenario, args) -> Path:
    seed = pick_seed(scenario.mtbf, args.minutes, args.seed, args.warmup_s)
    faults = storm_spec(scenario.mtbf, seed, args.minutes)
    if scenario.extra_faults:
        faults += f"; {scenario.extra_faults}"
    out = args.out / scenario.name
    command = chaos_command(out, faults, args, compare=False, extra=scenario.overrides)
    run = run_watched(scenario.name, out, command, args.stall_s)
    if run.stalled:
        print(f"[{scenario.name}] stalled ({run.stalled}): calibrated on what it wrote")
    return out


def calibrate(out: Path) -> dict:
    """One row: measured against predicted, and the measured run's losses by category."""
    row = {"name": out.name, "dir": out}
    summarize(out, f"{out.name} (accounted again)")  # this checkout's accounting, as calibrate's
    try:
        fit = ostinato("plan", "--calibrate", str(out), "--json")
    except RuntimeError as exc:
        row["error"] = str(exc).strip().splitlines()[-1]
        return row
    measured = json.loads((out / "goodput.json").read_text())
    row.update(
        measured=fit["measured"]["goodput"],
        predicted=fit["predicted"]["goodput"],
        wall=(fit["measured"]["wall_s"], fit["predicted"]["wall_s"]),
        interruptions=(fit["measured"]["interruptions"], fit["predicted"]["interruptions"]),
        faults=count_faults(out),
        shares={k: measured["seconds"][k] / measured["island_s"] for k in LOSSES},
    )
    assert abs(row["measured"] - measured["goodput"]) < 1e-9, "calibrate read another goodput"
    return row


def count_faults(out: Path) -> str:
    """'crash 2, hang 1, ...' from chaos.json, for the reader."""
    path = out / "chaos.json"
    if not path.exists():
        return "no chaos.json"
    kinds: dict[str, int] = {}
    for fault in json.loads(path.read_text())["faults"]:
        if fault["injected_at"] is not None:
            kinds[fault["kind"]] = kinds.get(fault["kind"], 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"


def print_calibration(rows: list[dict]) -> None:
    header = "run | faults struck | measured goodput | predicted | diff (pp) | within 5 pp"
    print(f"\n| {header} | wall s meas / pred | interruptions meas / pred |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | - | - | - | - | calibrate failed: {r['error']} | - | - |")
            continue
        diff = (r["predicted"] - r["measured"]) * 100
        ok = "yes" if abs(diff) <= TARGET_PP else "MISSED"
        print(
            f"| {r['name']} | {r['faults']} | {r['measured']:.1%} | {r['predicted']:.1%} "
            f"| {diff:+.1f} | {ok} | {r['wall'][0]:.0f} / {r['wall'][1]:.0f} "
            f"| {r['interruptions'][0]} / {r['interruptions'][1]:.1f} |"
        )
    print("\nwhere the measured runs lost time (share of island-seconds):")
    print("| run | " + " | ".join(LOSSES) + " |")
    print("| --- |" + " ---: |" * len(LOSSES))
    for r in rows:
        if "shares" in r:
            print(f"| {r['name']} | " + " | ".join(f"{r['shares'][k]:.1%}" for k in LOSSES) + " |")


# --- part 2: presets against published figures -------------------------------------------------


def preset_rows() -> list[tuple]:
    rows = []
    for preset, figures in PUBLISHED.items():
        answer = ostinato("plan", "--preset", preset, "--json")
        for label, key, published, source in figures:
            rows.append((preset, label, answer[key], published, source))
    return rows


def print_presets(rows: list[tuple]) -> None:
    header = "preset | figure | predicted | published | predicted / published | within 10%"
    print(f"\n| {header} | source |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- |")
    for preset, label, predicted, published, source in rows:
        r = predicted / published
        ok = "yes" if abs(r - 1) <= TARGET_PRESET else "MISSED"
        if "at least" in label:
            ok = "yes" if predicted >= published * (1 - TARGET_PRESET) else "MISSED"
        spec = ".1%" if published < 1 else ",.0f"
        print(
            f"| {preset} | {label} | {format(predicted, spec)} | {format(published, spec)} "
            f"| {r:.3f} | {ok} | {source} |"
        )


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    storm_runs = ROOT / "runs" / "bench" / "chaos_storm"
    also = [p for p in sorted(storm_runs.glob("storm-mtbf*")) if (p / "goodput.json").exists()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="length of each chaos run")
    parser.add_argument("--round-s", type=float, default=10.0, help="time budget of a round")
    parser.add_argument("--seed", type=int, default=1, help="first storm seed to try")
    parser.add_argument("--warmup-s", type=float, default=45.0, help="no storm fault before")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "plan_accuracy")
    parser.add_argument("--stall-s", type=float, default=180.0, help="watchdog: no round for")
    parser.add_argument("--also", type=Path, nargs="*", default=also, help="more chaos dirs")
    parser.add_argument("--only", nargs="*", help="run only these scenarios (names)")
    parser.add_argument("--reuse", action="store_true", help="keep runs that wrote chaos.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dirs = []
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        done = (args.out / scenario.name / "chaos.json").exists()
        if args.reuse and done:
            print(f"[{scenario.name}] reusing the finished run in {args.out / scenario.name}")
            dirs.append(args.out / scenario.name)
        else:
            dirs.append(run_scenario(scenario, args))
    rows = [calibrate(d) for d in [*dirs, *args.also]]
    print_calibration(rows)
    print_presets(preset_rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())
