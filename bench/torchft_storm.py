"""An ostinato fleet and torchft's DiLoCo under the same storm of SIGKILLs, side by side.

The setup of bench/torchft_vs_fleet.py (same model, data streams, inner AdamW, H inner steps per
round, fp32 pseudo-gradients, Nesterov outer SGD, matched failure detection), with three replicas
(a, b, c) instead of two and a random storm of crashes instead of one kill: the schedule is
`storm:mtbf=M,seed=S,kinds=crash` expanded by ostinato's own parser (never more replicas down
than leave one up), applied by this script from the moment every replica has trained its first
step: SIGKILL the replica's process, start it again at once, as a supervisor would. Each side
also runs the same rounds without faults.

Printed per side: wall time to commit all rounds (storm and fault-free), their ratio (the fleet's
goodput under the storm: fault-free time over storm time), the share of replica-seconds spent
on inner steps whose work reached a committed round (storm and fault-free), inner steps
discarded, and the final validation loss of the global parameters against the fault-free run.

    .venv/bin/python bench/torchft_storm.py [--rounds 60] [--mtbf 20] [--seed 3]
        [--venv /tmp/torchft-venv --make-venv] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
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

from ostinato.faults.spec import parse_faults

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


def first_steps_logged(paths: list[Path]) -> bool:
    return all(any("step" in r or r.get("kind") == "compute" for r in read_jsonl(p)) for p in paths)


def drive(replicas: Replicas, step_logs: list[Path], storm: list, tick, timeout: float) -> float:
    """Wait for every replica's first step, then strike the storm; returns when the storm's
    clock started. After the first replica finishes the run, the others get 15 s to finish with
    it (a replica restarted too late would train a run of its own) and are then stopped."""
    deadline = time.monotonic() + timeout
    while not first_steps_logged(step_logs):
        tick()
        if time.monotonic() > deadline or replicas.all_done():
            raise SystemExit(f"the replicas never all trained a step; see {step_logs[0].parent}")
        time.sleep(0.05)
    began, pending = time.time(), list(storm)
    while not replicas.any_finished():
        tick()
        if pending and time.time() - began >= pending[0].at_s:
            replicas.crash(pending.pop(0).island)
        if time.monotonic() > deadline:
            raise SystemExit("the run did not finish in time")
        time.sleep(0.02)
    ended = time.monotonic() + 15
    while not replicas.all_done() and time.monotonic() < ended:
        tick()
        time.sleep(0.1)
    finish(list(replicas.procs.values()), timeout=1)
    return began


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
    logs = [out / n / "events.jsonl" for n in NAMES]
    began = drive(replicas, logs, storm, copier.poll, timeout=args.rounds * 60)
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
    logs = [out / f"{n}.steps.jsonl" for n in NAMES]
    began = drive(replicas, logs, storm, lambda: None, timeout=args.rounds * 60)
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


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print("\n| measure | ostinato | torchft |")
    print("| --- | ---: | ---: |")
    rows = [
        ("kills", "storm", "kills", "d"),
        ("wall s, fault-free", "clean", "wall_s", ".1f"),
        ("wall s, storm", "storm", "wall_s", ".1f"),
        ("fleet goodput (fault-free wall / storm wall)", None, "ratio", ".1%"),
        ("replica time on kept steps, fault-free", "clean", "kept_share", ".1%"),
        ("replica time on kept steps, storm", "storm", "kept_share", ".1%"),
        ("inner steps discarded, storm", "storm", "discarded", "d"),
        ("median inner step s, storm", "storm", "step_s", ".3f"),
        ("final val loss, fault-free", "clean", "final_loss", ".4f"),
        ("final val loss, storm", "storm", "final_loss", ".4f"),
        ("final loss storm / fault-free", None, "loss_ratio", ".4f"),
    ]
    for label, run, key, spec in rows:
        cells = []
        for side in ("ostinato", "torchft"):
            got = results.get(side, {})
            if run is None:
                clean, storm = got.get("clean", {}), got.get("storm", {})
                pair = ("wall_s", "wall_s") if key == "ratio" else ("final_loss", "final_loss")
                a, b = clean.get(pair[0]), storm.get(pair[1])
                value = (a / b if key == "ratio" else b / a) if a and b else None
            else:
                value = got.get(run, {}).get(key)
            cells.append(fmt(value, spec))
        print(f"| {label} | {' | '.join(cells)} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h", type=int, default=20, help="inner steps per round")
    parser.add_argument("--rounds", type=int, default=60, help="rounds per run")
    parser.add_argument("--batch", type=int, default=8, help="sequences per replica per step")
    parser.add_argument("--mtbf", type=float, default=20.0, help="seconds between crashes")
    parser.add_argument("--seed", type=int, default=3, help="storm seed")
    parser.add_argument("--storm-s", type=float, default=240.0, help="storm duration")
    parser.add_argument("--restart-s", type=float, default=10.0, help="for the quorum check")
    parser.add_argument("--detect-s", type=float, default=2.0, help="failure detection timeout")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="collective timeout")
    parser.add_argument("--venv", default="/tmp/torchft-venv", help="torchft's own venv")
    parser.add_argument("--make-venv", action="store_true", help="create --venv if missing")
    parser.add_argument("--sides", nargs="+", default=["ostinato", "torchft"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/torchft_storm"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    if "torchft" in args.sides and args.make_venv and (why := make_venv(Path(args.venv))):
        raise SystemExit(f"torchft venv: {why}")
    cfg, seeds = prepare_data(args.out, args, NAMES)
    spec = f"storm:mtbf={args.mtbf:g}s,seed={args.seed},kinds=crash,duration={args.storm_s:g}s"
    storm = parse_faults(spec, list(NAMES), restart_s=args.restart_s)
    print(f"{spec}: {', '.join(f'{f.island}@{f.at_s:.0f}s' for f in storm)}")
    print(f"H={args.h}, {args.rounds} rounds, detection {args.detect_s:g} s", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for run, faults in (("clean", []), ("storm", storm)):
        for name in args.sides:
            run_dir = args.out / run / name
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
    print_table(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
