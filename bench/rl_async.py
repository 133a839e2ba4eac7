"""Asynchrony in GRPO: `rl.max_staleness` 0, 1 and 4 side by side, on the same start.

Each run is `ostinato rl` on configs/rl-demo.toml (two rollout islands beside the trainer) from
the same SFT checkpoint, with only `rl.max_staleness` changed; the runs go one after another
on the same machine. Printed per run: updates done, wall seconds, the trainer's idle share
(seconds it waited for rollouts over its wall seconds), the staleness of the rollouts it
trained on, and held-out accuracy (greedy, `rl.eval_problems` problems) at the same
wall-clock time for every run: the last evaluation each made before the shortest run ended.

    .venv/bin/python bench/rl_async.py --init runs/demo-sft [--steps 60] [--eval-every 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(init: Path, staleness: int, steps: int, eval_every: int, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "ostinato",
        "rl",
        "--config",
        str(ROOT / "configs/rl-demo.toml"),
    ]
    command += ["--out", str(out), f"--rl.init={init}", f"--rl.max_staleness={staleness}"]
    command += [f"--rl.steps={steps}", f"--rl.eval_every={eval_every}"]
    started = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    curve = [(0.0, summary["initial_accuracy"])]
    curve += [(r["time"] - started, r["accuracy"]) for r in lines if "accuracy" in r]
    staleness_seen: Counter = Counter()
    for record in lines:
        staleness_seen.update({int(k): v for k, v in record["staleness"].items()})
    wall = lines[-1]["time"] - started
    return {
        "staleness": staleness,
        "updates": len(lines),
        "wall_s": wall,
        "idle_share": sum(r["trainer_idle_s"] for r in lines) / wall,
        "staleness_seen": dict(sorted(staleness_seen.items())),
        "dropped_stale": sum(r["dropped_stale_rollouts"] for r in lines),
        "curve": curve,
        "final_accuracy": summary["final_accuracy"],
    }


def accuracy_at(curve: list[tuple[float, float]], seconds: float) -> tuple[float, float]:
    """(time, accuracy) of the last evaluation made by `seconds`."""
    return max((point for point in curve if point[0] <= seconds), key=lambda p: p[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True, help="an `ostinato train` run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--staleness", default="0,1,4")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for k in (int(s) for s in args.staleness.split(",")):
            results.append(
                run(args.init.resolve(), k, args.steps, args.eval_every, Path(work) / f"s{k}")
            )
            r = results[-1]
            print(f"max_staleness {k}: {r['updates']} updates in {r['wall_s']:.0f} s", flush=True)
    equal = min(r["curve"][-1][0] for r in results)
    print(f"accuracy at equal wall-clock: the last evaluation by {equal:.0f} s")
    print(
        f"{'staleness':>9} {'updates':>7} {'wall s':>7} {'idle share':>10} "
        f"{'staleness seen':>22} {'dropped':>7} {'acc @ equal':>16} {'final acc':>9}"
    )
    for r in results:
        at, acc = accuracy_at(r["curve"], equal)
        seen = ", ".join(f"{k}:{v}" for k, v in r["staleness_seen"].items())
        print(
            f"{r['staleness']:>9} {r['updates']:>7} {r['wall_s']:>7.0f} {r['idle_share']:>10.1%} "
            f"{seen:>22} {r['dropped_stale']:>7} {f'{acc:.0%} (at {at:.0f} s)':>16} "
            f"{r['final_accuracy']:>9.0%}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
