"""Running fleets as a user would, from tests: processes, their output, the coordinator's view."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ostinato.checkpoint.reader import load_trained
from ostinato.fleet import wire
from ostinato.fleet.outer import digest, flatten
from ostinato.fleet.shards import island_digest, shard_bounds
from ostinato.train.metrics import read_metrics
from tests.conftest import TINY, cli_env

TOKEN = "test-fleet-token"
FAST = [
    "--fleet.heartbeat_s=0.2",
    "--fleet.heartbeat_timeout_s=2",
    "--fleet.timeout_s=5",
    "--fleet.grace_s=2",
    "--fleet.compression=int8",
]

# Step budgets: every island trains H steps a round, whatever the machine's speed or load, so a
# fault-free fleet is deterministic and runs as many tokens as the storm's recipe.
STEP_BUDGET = [
    "--fleet.budget=steps:5",
    "--checkpoint.every=5",  # some kills land while a checkpoint is written
    "--fleet.heartbeat_s=0.2",
    "--fleet.timeout_s=5",
    "--fleet.grace_s=1",
    "--train.eval_problems=0",
    "--train.samples=0",
]


def fleet_env() -> dict[str, str]:
    return {**cli_env(), "OSTINATO_FLEET_TOKEN": TOKEN, "TORCH_CPP_LOG_LEVEL": "ERROR"}


class Running:
    """A process whose output lines are collected as they come."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fleet_env()
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if prefix in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no line with {prefix!r} in:\n{self.output[-3000:]}")

    def wait(self, timeout: float = 200) -> int:
        return self.process.wait(timeout=timeout)


def ostinato(*args: str) -> list[str]:
    return [sys.executable, "-m", "ostinato", *args]


def fleet_local(out: Path, islands: int, *args: str) -> Running:
    return Running(
        ostinato(
            "fleet",
            "local",
            "--config",
            str(TINY),
            "--out",
            str(out),
            "--islands",
            str(islands),
            *FAST,
            *args,
        )
    )


def status(address: str) -> dict:
    return wire.Keys(wire.connect(address, 5), wire.namespace(TOKEN)).get("status") or {}


def wait_until(predicate, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def island_pids(out: Path, name: str) -> list[int]:
    """The processes of island `name` of the fleet whose run directory is `out`, and of no other:
    tests run in parallel, with islands of the same names (and pytest's tmp_path makes `out`
    this test's own). An island's command line names its run directory, `--out OUT/NAME`."""
    island, run_dir = f"--fleet.island={name}".encode(), str(out / name).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if island in argv and (b"--out", run_dir) in zip(argv, argv[1:], strict=False):
            found.append(int(cmdline.parent.name))
    return sorted(found)


def island_pid(out: Path, name: str) -> int:
    """The current process of island `name` of `fleet local`'s fleet in `out` (its islands.json:
    a restart may run in a warm spare, under the spare's command line), else found by /proc."""
    recorded = out / "islands.json"
    if recorded.exists():
        return json.loads(recorded.read_text())[name]
    pids = island_pids(out, name)
    assert len(pids) == 1, f"island {name} of {out}: processes {pids}"
    return pids[0]


def rank_pid(out: Path, name: str, rank: int) -> int:
    """The process of one rank of a torchrun island (its RANK in the environment)."""
    for pid in island_pids(out, name):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} of island {name} of {out}")


def torchrun(nproc: int, *args: str) -> list[str]:
    """A multi-rank island as a user starts one; torchrun restarts its ranks once."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--max-restarts=1", f"--nproc_per_node={nproc}", *args]


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a coordinator restarted on it
    finds it free again, where an ephemeral port may meanwhile be taken as the source port of
    one of the many connections a busy test machine makes (a restarted coordinator would then
    fail to bind)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(20000, min(low, 32768)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def final_digests(out: Path, names: list[str]) -> dict[str, str]:
    """Digest of each island's final parameters, as the fleet logs it in rounds.jsonl: of its
    fleet shards (fleet/shards.py), as many as the rounds say."""
    log = rounds(out)
    shards = log[-1].get("shards", 1) if log else 1
    digests = {}
    for name in names:
        flat = flatten(load_trained(out / name).model)
        cut = [digest(flat[lo:hi]) for lo, hi in shard_bounds(flat.numel(), shards)]
        digests[name] = island_digest(cut)
    return digests


def rounds(out: Path) -> list[dict]:
    path = out / "rounds.jsonl"
    return read_metrics(path) if path.exists() else []


def assert_every_round(log: list[dict], total: int, coordinator_output: str) -> None:
    """Every round 1..total committed, the last one last. Since the rewind was withdrawn a
    restore carries the fleet on under the next round numbers, so no round repeats; a repeat
    passes only if the coordinator says the rounds after a restore are trained again."""
    numbers = [r["round"] for r in log]
    assert sorted(set(numbers)) == list(range(1, total + 1)) and numbers[-1] == total, numbers
    if len(numbers) != len(set(numbers)):
        assert "trained again" in coordinator_output, numbers
