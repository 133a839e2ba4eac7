"""How long a crash costs: kill -> the survivor training again, and restart -> first inner step.

Runs the demo's fleet shape (`ostinato fleet local`, configs/demo.toml, two islands of one thread,
one per core) on a step budget and SIGKILLs island b --kills times, each time while an exchange is
under way (island b's emulated link adds --latency to its exchanges, so one lasts long enough to
be struck; `fleet local` restarts b at once, as a supervisor would). Per kill it reads:

- kill -> survivor: from the kill to the start of island a's next inner step (its events.jsonl);
- restart: from the kill to the end of the restarted island's first inner step, and where those
  seconds go, phase by phase (its startup.jsonl, ostinato.startup): the supervisor starting a
  process (or handing the island to its warm spare, fleet/spare.py), imports, data (corpus,
  tokenizer, tokens), model, checkpoint, join, heal, first step. --no-warm-spare restarts cold.

Prints the median and range of each over the kills.

    .venv/bin/python bench/recovery.py [--kills 6] [--h 10] [--latency 300ms] [--out DIR]
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
from pathlib import Path

from ostinato.fleet import wire
from ostinato.jsonl import read_jsonl
from ostinato.startup import PHASES

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-recovery"


def fleet_command(args, out: Path) -> list[str]:
    rounds = 3 * (args.kills + 2)  # a kill every third round, and room to finish
    command = [sys.executable, "-m", "ostinato", "fleet", "local", "--config", str(args.config)]
    command += ["--out", str(out), "--islands", "2", "--train.threads=1"]
    command += [f"--fleet.budget=steps:{args.h}", f"--fleet.rounds={rounds}"]
    command += [f"--train.steps={rounds * args.h}", "--checkpoint.every=5"]
    command += ["--fleet.heartbeat_s=0.2", "--fleet.heartbeat_timeout_s=5", "--fleet.grace_s=2"]
    command += ["--train.eval_problems=0", "--train.samples=0", f"--max-restarts={args.kills}"]
    command += ["--for", f"b:faults.schedule=link@island=b,latency={args.latency}"]
    return command + ([] if args.warm_spare else ["--no-warm-spare"])


def island_pid(out: Path, name: str) -> int:
    """The current process of island `name`, from `fleet local`'s OUT/islands.json (a restart in
    a warm spare runs under the spare's command line)."""
    return int(json.loads((out / "islands.json").read_text())[name])


def wait_for(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit(f"bench: no {what} within {timeout:.0f} s")


def strike(out: Path, keys: wire.Keys, after_round: int) -> float:
    """SIGKILL island b during an exchange of a round after `after_round`; the kill's time."""

    def exchanging() -> bool:
        status = keys.get("status") or {}
        islands = {i["island"]: i for i in status.get("islands", [])}
        b = islands.get("b", {})
        return (
            status.get("phase") == "exchange"
            and status.get("round", 0) > after_round
            and b.get("state") == "syncing"
        )

    wait_for(exchanging, 300, "exchange to strike")
    pid = island_pid(out, "b")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    return killed_at


def next_step_after(out: Path, island: str, at: float) -> float | None:
    starts = [
        e["start"]
        for e in read_jsonl(out / island / "events.jsonl")
        if e.get("type") == "span" and e.get("kind") == "compute" and e["start"] >= at
    ]
    return min(starts) if starts else None


def newer(path: Path, seen: int) -> list[dict] | None:
    """The startup records of island b once a new one (a new process's) is there."""
    records = read_jsonl(path) if path.exists() else []
    return records if len(records) > seen else None


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--h", type=int, default=10, help="inner steps per round")
    parser.add_argument("--latency", default="300ms", help="island b's added exchange latency")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ostinato-bench-recovery"))
    parser.add_argument(
        "--warm-spare", action=argparse.BooleanOptionalAction, default=True, help="fleet local's"
    )
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    env = {**os.environ, "OSTINATO_FLEET_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    log = open(args.out.parent / f"{args.out.name}.log", "w")  # noqa: SIM115 (lives with the run)
    fleet = subprocess.Popen(
        fleet_command(args, args.out), stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        measure(args, fleet)
    finally:
        fleet.send_signal(signal.SIGINT)  # fleet local stops its coordinator and islands
        try:
            fleet.wait(timeout=30)
        except subprocess.TimeoutExpired:
            fleet.kill()
            fleet.wait()


def measure(args, fleet: subprocess.Popen) -> None:
    out, log_path = args.out, args.out.parent / f"{args.out.name}.log"

    def address() -> str | None:
        for line in log_path.read_text().splitlines():
            if "coordinator on " in line:
                return line.split("coordinator on ")[1].split(";")[0].strip()
        return None

    keys = wire.Keys(wire.connect(wait_for(address, 120, "coordinator"), 30), wire.namespace(TOKEN))
    kills, survivor, restarts = [], [], []
    startup = out / "b" / "startup.jsonl"
    for n in range(args.kills):
        killed_at = strike(out, keys, after_round=3 * n + 1)
        seen = len(read_jsonl(startup))  # the killed process's own record is in by now
        kills.append(killed_at)
        records = wait_for(lambda seen=seen: newer(startup, seen), 300, "restart's first step")
        restarts.append(records[-1])
        next_step = wait_for(
            lambda at=killed_at: next_step_after(out, "a", at), 120, "a's next step"
        )
        survivor.append(next_step - killed_at)
        restart_s = restarts[-1]["marks"]["first_step"] - killed_at
        spare = "a warm spare" if restarts[-1].get("spare") else "a new process"
        print(
            f"kill {n + 1}: survivor training again after {survivor[-1]:.2f} s; "
            f"restarted island's first step {restart_s:.2f} s after the kill ({spare})",
            flush=True,
        )
    report(kills, survivor, restarts)


def report(kills: list[float], survivor: list[float], restarts: list[dict]) -> None:
    print(f"\n{len(kills)} kills of island b mid-exchange (median (min-max), seconds)")
    print(f"  kill -> survivor's next inner step:     {summary(survivor)}")
    total = [r["marks"]["first_step"] - k for r, k in zip(restarts, kills, strict=True)]
    spawn = [r["marks"]["process"] - k for r, k in zip(restarts, kills, strict=True)]
    spares = sum(bool(r.get("spare")) for r in restarts)
    print(f"  kill -> restarted island's first step:  {summary(total)}")
    print(f"    of which, per phase ({spares} of {len(restarts)} restarts ran in a warm spare):")
    print(f"    {'start':<12} {summary(spawn)}  (kill -> process started, or spare taken)")
    for phase in PHASES[1:]:
        values = [r["seconds"][phase] for r in restarts if phase in r["seconds"]]
        print(f"    {phase:<12} {summary(values)}")
    print(json.dumps({"survivor_s": survivor, "restart_s": total, "spawn_s": spawn}))


if __name__ == "__main__":
    main()
