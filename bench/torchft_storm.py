"""An ostinato fleet and torchft's DiLoCo under the same storm of SIGKILLs, side by side.

The setup of bench/torchft_vs_fleet.py (same model, data streams, inner AdamW, H inner steps per
round, fp32 pseudo-gradients, Nesterov outer SGD, matched failure detection), with three replicas
(a, b, c) instead of two and a storm of crashes instead of one kill. The storm is a schedule in
rounds, drawn from --seed: --kills SIGKILLs, each at a random replica once the side has committed
a given round (every third round at most, never in the first or the last fifth), so both sides
are struck the same number of times at the same points of the run, however fast each is. The
script sends them (SIGKILL the replica's process, start it again at once, as a supervisor would).
Each side also runs the same rounds without faults (with --kills 0, only those: a measure of the
inner step with the fleet around it). All of it is repeated for each of --seeds, the two sides
back to back, in an order that alternates from run to run (run_order).

Three replicas share the machine's cores, so anything else that runs takes time from their steps:
the fleet writes its checkpoint at its default cadence (--fleet-checkpoint-every 5; torchft's
replicas write none), and this script follows the logs by their new lines only (Tail).

Printed per side and seed: wall time to commit all rounds (storm and fault-free), their ratio (the
fleet's goodput under the storm: fault-free time over storm time), the share of replica-seconds
spent on inner steps whose work reached a committed round, inner steps discarded, and the final
validation loss; then the median and the range over the seeds of each, and the ratio of the two
sides' median inner steps over the back-to-back pairs.

    .venv/bin/python bench/torchft_storm.py [--rounds 40] [--kills 8] [--seeds 1 2 3]
        [--fleet-checkpoint-every 5] [--venv /tmp/torchft-venv --make-venv] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torchft_vs_fleet import (
    RECIPE,
    CheckpointCopier,
    Side,
    Tail,
    add_checkpoint_options,
    finish,
    fleet_options,
    make_venv,
    ostinato_curve,
    ostinato_steps,
    prepare_data,
    read_jsonl,
    spawn,
    start_coordinator,
    start_lighthouse,
    torchft_curve,
    torchft_steps,
    venv_python,
)

NAMES = ("a", "b", "c")
WORKER = Path(__file__).with_name("torchft_vs_fleet.py")


class Replicas:
    """The replica processes of one side: started, killed and restarted by name."""

    def __init__(self, start):
        self.start = start  # (name, life) -> Popen
        self.procs = {name: start(name, 0) for name in NAMES}
        self.restarts: dict[str, list[float]] = {name: [] for name in NAMES}
        self.kills: list[tuple[str, float]] = []

    def crash(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.kills.append((name, time.time()))
        self.restarts[name].append(time.time())
        self.procs[name] = self.start(name, len(self.restarts[name]))

    def any_finished(self) -> bool:
        return any(p.poll() == 0 for p in self.procs.values())

    def all_done(self) -> bool:
        return all(p.poll() is not None for p in self.procs.values())


def round_storm(seed: int, kills: int, rounds: int) -> list[tuple[str, int]]:
    """(replica, round) for each kill: at distinct rounds at least 3 apart, between the first and
    the last fifth of the run, each at a random replica."""
    rng = random.Random(seed)
    slots = list(range(max(2, rounds // 5), max(3, rounds * 4 // 5), 3))
    chosen = sorted(rng.sample(slots, min(kills, len(slots))))
    return [(rng.choice(NAMES), number) for number in chosen]


def drive(replicas: Replicas, progress, storm: list, tick, timeout: float) -> float:
    """Wait for every replica's first step, then strike each kill of the storm once the side has
    committed its round (`progress()`: rounds committed); returns when the storm began. After the
    first replica finishes the run, the others get 15 s to finish with it (a replica restarted
    too late would train a run of its own) and are then stopped."""
    deadline = time.monotonic() + timeout
    while progress() is None:
        tick()
        if time.monotonic() > deadline or replicas.all_done():
            raise SystemExit("the replicas never all trained a step")
        time.sleep(0.05)
    began, pending = time.time(), list(storm)
    while not replicas.any_finished():
        tick()
        if pending and (progress() or 0) >= pending[0][1]:
            replicas.crash(pending.pop(0)[0])
        if time.monotonic() > deadline:
            raise SystemExit("the run did not finish in time")
        time.sleep(0.02)
    ended = time.monotonic() + 15
    while not replicas.all_done() and time.monotonic() < ended:
        tick()
        time.sleep(0.1)
    finish(list(replicas.procs.values()), timeout=1)
    return began


def ostinato_progress(out: Path):
    """Rounds the fleet committed, once every island has trained a step (None before)."""
    events = {n: Tail(out / n / "events.jsonl") for n in NAMES}
    rounds, trained, committed = Tail(out / "rounds.jsonl"), set(), 0

    def progress() -> int | None:
        nonlocal committed
        for name, tail in events.items():
            if name not in trained and any(r.get("kind") == "compute" for r in tail.new_rows()):
                trained.add(name)
        if len(trained) < len(NAMES):
            return None
        committed += len(rounds.new_rows())
        return committed

    return progress


def torchft_progress(out: Path):
    """Syncs committed by the replica furthest on, once every replica has trained a step."""
    logs = {n: Tail(out / f"{n}.steps.jsonl") for n in NAMES}
    trained, committed = set(), dict.fromkeys(NAMES, 0)

    def progress() -> int | None:
        for name, tail in logs.items():
            for row in tail.new_rows():
                trained.update([name] if "step" in row else [])
                committed[name] += bool(row.get("committed"))
        if len(trained) < len(NAMES):
            return None
        return max(committed.values())

    return progress


def run_ostinato(out: Path, cfg: list[str], storm: list, args) -> Side:
    os.environ["OSTINATO_FLEET_TOKEN"] = secrets.token_hex(16)
    coordinator, address = start_coordinator(out, cfg, args, expect=len(NAMES))

    def island(name: str, life: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "ostinato", "train", "--config", str(RECIPE)]
        command += ["--out", str(out / name), "--resume", "auto" if life else "none"]
        command += [*[f"--{o}" for o in cfg], *fleet_options(args)]
        command += [f"--fleet.coordinator={address}", f"--fleet.island={name}"]
        return spawn(command, out / f"{name}.log")

    replicas = Replicas(island)
    copier = CheckpointCopier(out / "fleet" / "checkpoints", out / "globals")
    began = drive(replicas, ostinato_progress(out), storm, copier.poll, args.rounds * 60)
    copier.poll()
    coordinator.terminate()
    finish([coordinator], timeout=10)
    side = Side("ostinato", ostinato_steps(out, replicas.restarts), began, began)
    side.rounds = len(read_jsonl(out / "rounds.jsonl"))
    side.curve = ostinato_curve(out, cfg)
    side.note = json.dumps(replicas.kills)
    return side


def run_torchft(out: Path, cfg: list[str], seeds: dict, storm: list, args) -> Side:
    lighthouse, address = start_lighthouse(out, args)
    setup = {"overrides": cfg, "h": args.h, "rounds": args.rounds, "lighthouse": address}
    setup |= {"timeout_s": args.timeout_s, "seeds": seeds}
    (out / "setup.json").write_text(json.dumps(setup))

    def worker(name: str, life: int) -> subprocess.Popen:
        python = str(venv_python(Path(args.venv)))
        return spawn(
            [python, str(WORKER), "worker", str(out), name, str(life)], out / f"{name}.log"
        )

    replicas = Replicas(worker)
    began = drive(replicas, torchft_progress(out), storm, lambda: None, args.rounds * 60)
    lighthouse.terminate()
    finish([lighthouse], timeout=10)
    side = Side("torchft", torchft_steps(out, NAMES), began, began)
    side.curve = torchft_curve(out, cfg)
    side.note = json.dumps(replicas.kills)
    return side


def summary(side: Side) -> dict:
    """Wall time from the storm's start to the last kept step, the share of replica-seconds on
    kept inner steps, steps discarded, the final validation loss. Side.kill holds when the
    storm's clock started: this run has many kills, not one."""
    steps = [s for name in NAMES for s in side.steps[name] if s.end >= side.kill]
    kept = [s for s in steps if s.kept]
    end = max((s.end for s in kept), default=side.kill)
    wall = end - side.kill
    kept_s = sum(min(s.end, end) - max(s.start, side.kill) for s in kept)
    return {
        "wall_s": wall,
        "kept_share": kept_s / (len(NAMES) * wall) if wall > 0 else None,
        "steps": len(steps),
        "discarded": sum(not s.kept for s in steps),
        "step_s": statistics.median(s.end - s.start for s in steps) if steps else None,
        "final_loss": side.curve[-1][1] if side.curve else None,
        "kills": len(json.loads(side.note or "[]")),
    }


ROWS = [  # label, run ("clean" or "storm"; None: the storm over the clean run), key, format
    ("kills", "storm", "kills", "d"),
    ("wall s, fault-free", "clean", "wall_s", ".1f"),
    ("wall s, storm", "storm", "wall_s", ".1f"),
    ("fleet goodput (fault-free wall / storm wall)", None, "ratio", ".1%"),
    ("replica time on kept steps, fault-free", "clean", "kept_share", ".1%"),
    ("replica time on kept steps, storm", "storm", "kept_share", ".1%"),
    ("inner steps discarded, storm", "storm", "discarded", "d"),
    ("median inner step s, fault-free", "clean", "step_s", ".3f"),
    ("median inner step s, storm", "storm", "step_s", ".3f"),
    ("final val loss, fault-free", "clean", "final_loss", ".4f"),
    ("final val loss, storm", "storm", "final_loss", ".4f"),
    ("final loss storm / fault-free", None, "loss_ratio", ".4f"),
]


def value_of(got: dict, run: str | None, key: str) -> float | None:
    if run is not None:
        return got.get(run, {}).get(key)
    clean, storm = got.get("clean", {}), got.get("storm", {})
    field = "wall_s" if key == "ratio" else "final_loss"
    a, b = clean.get(field), storm.get(field)
    if not a or not b:
        return None
    return a / b if key == "ratio" else b / a


def fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if spec == "d" and value != int(value):  # the median of an even number of counts
        return format(value, ".1f")
    return format(int(value) if spec == "d" else value, spec)


def spread(values: list, spec: str) -> str:
    """Median (min-max) of the seeds' values."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0], spec)
    middle = statistics.median(values)
    return f"{fmt(middle, spec)} ({fmt(min(values), spec)}-{fmt(max(values), spec)})"


def print_table(results: dict[int, dict[str, dict[str, dict]]]) -> None:
    """One column per side and seed, then per side the median and range over the seeds."""
    seeds, sides = sorted(results), ("ostinato", "torchft")
    heads = [f"{side} s{seed}" for seed in seeds for side in sides]
    print(
        f"\n| measure | {' | '.join(heads)} | ostinato, median (range) | torchft, median (range) |"
    )
    print("| --- |" + " ---: |" * (len(heads) + 2))
    for label, run, key, spec in ROWS:
        cells = [
            fmt(value_of(results[s].get(side, {}), run, key), spec) for s in seeds for side in sides
        ]
        for side in sides:
            cells.append(
                spread([value_of(results[s].get(side, {}), run, key) for s in seeds], spec)
            )
        print(f"| {label} | {' | '.join(cells)} |")
    wins = [
        value_of(results[s].get("ostinato", {}), None, "ratio") is not None
        and value_of(results[s].get("ostinato", {}), None, "ratio")
        >= (value_of(results[s].get("torchft", {}), None, "ratio") or 0)
        for s in seeds
    ]
    if any("storm" in got.get("ostinato", {}) for got in results.values()):
        print(f"\nfleet goodput >= torchft's on {sum(wins)} of {len(seeds)} seeds")
    for run, label in (("clean", "fault-free"), ("storm", "storm")):
        if ratios := step_ratios(results, run):
            print(
                f"median inner step, ostinato / torchft, {label}: {spread(ratios, '.3f')}"
                f" over {len(ratios)} back-to-back pairs"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h", type=int, default=20, help="inner steps per round")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per replica per step")
    parser.add_argument("--kills", type=int, default=8, help="SIGKILLs per storm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="storm seeds")
    parser.add_argument("--restart-s", type=float, default=10.0, help="for the quorum check")
    parser.add_argument("--detect-s", type=float, default=2.0, help="failure detection timeout")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="collective timeout")
    parser.add_argument("--venv", default="/tmp/torchft-venv", help="torchft's own venv")
    parser.add_argument("--make-venv", action="store_true", help="create --venv if missing")
    parser.add_argument("--sides", nargs="+", default=["ostinato", "torchft"])
    why = "the fleet's own; the final loss needs only the last, which is always written"
    add_checkpoint_options(parser, fleet_every=5, why=why)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/torchft_storm"))
    return parser.parse_args()


def run_seed(args, cfg: list[str], seeds: dict, seed: int) -> dict[str, dict[str, dict]]:
    storm = round_storm(seed, args.kills, args.rounds)
    print(f"seed {seed}: {', '.join(f'{name}@round {n}' for name, n in storm)}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    (args.out / f"seed{seed}").mkdir()
    (args.out / f"seed{seed}" / "data.pt").symlink_to((args.out / "data.pt").resolve())
    runs = [("clean", [])] + ([("storm", storm)] if args.kills else [])
    for index, (run, faults) in enumerate(runs):
        for name in run_order(args.sides, seed, index):
            run_dir = args.out / f"seed{seed}" / run / name
            run_dir.mkdir(parents=True)
            started = time.perf_counter()
            if name == "ostinato":
                side = run_ostinato(run_dir, cfg, faults, args)
            else:
                side = run_torchft(run_dir, cfg, seeds, faults, args)
            results.setdefault(name, {})[run] = summary(side)
            took = time.perf_counter() - started
            print(f"{name} {run}: {took:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
            print(f"  {json.dumps(results[name][run])}", flush=True)
    return results


def run_order(sides: list[str], seed: int, index: int) -> list[str]:
    """Which side runs first alternates from run to run (ABBA over a seed's two runs, and the
    next seed starts the other way), so a machine that drifts slower or faster over the bench
    does not favour the side that always goes first."""
    return list(sides) if (seed + index) % 2 else list(sides)[::-1]


def step_ratios(results: dict[int, dict[str, dict[str, dict]]], run: str) -> list[float]:
    """Per seed, ostinato's median inner step over torchft's in the same run: each pair ran
    back to back, so the machine's drift over the bench cancels in the ratio."""
    ratios = []
    for got in results.values():
        ours = value_of(got.get("ostinato", {}), run, "step_s")
        theirs = value_of(got.get("torchft", {}), run, "step_s")
        if ours and theirs:
            ratios.append(ours / theirs)
    return ratios


def main() -> None:
    args = parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    if "torchft" in args.sides and args.make_venv and (why := make_venv(Path(args.venv))):
        raise SystemExit(f"torchft venv: {why}")
    cfg, seeds = prepare_data(args.out, args, NAMES)
    print(f"H={args.h}, {args.rounds} rounds, {args.kills} kills, detection {args.detect_s:g} s")
    results = {seed: run_seed(args, cfg, seeds, seed) for seed in args.seeds}
    print_table(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
