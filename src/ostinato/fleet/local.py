"""`ostinato fleet local`: a whole fleet on one machine, as processes, with their output streamed.

Starts the coordinator and one `ostinato train` per island, prefixes each line with the island's
name, and restarts an island whose process dies (as torchrun --max-restarts would), so a crash
costs that island its round and the fleet carries on. A restart runs in a warm spare when one is
ready (fleet/spare.py). The islands' current process ids are kept in OUT/islands.json.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ostinato.errors import PERMANENT, UNREACHABLE
from ostinato.fleet.guards import read_guard_log
from ostinato.fleet.spare import Spare
from ostinato.goodput import render_table, summarize

console = Console(highlight=False)
# The coordinator's guards that find an island alive but stuck, and what each found.
HUNG_GUARDS = {"heartbeat": "silent", "progress": "not progressing"}


def island_names(count: int, names: str | None) -> list[str]:
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        if len(chosen) != count or len(set(chosen)) != count:
            raise ValueError(f"--names {names!r}: give {count} distinct names, one per island")
        return chosen
    if not 1 <= count <= 26:
        raise ValueError(f"--islands {count}: a local fleet has 1 to 26 islands")
    return list(string.ascii_lowercase[:count])


def island_ranks(ranks: str | None, names: list[str]) -> dict[str, int]:
    """`--ranks 2,1` into {island: ranks}; every island has one rank without it."""
    if ranks is None:
        return dict.fromkeys(names, 1)
    words = [w.strip() for w in ranks.split(",")]
    if len(words) != len(names) or not all(w.isdigit() and int(w) >= 1 for w in words):
        raise ValueError(
            f"--ranks {ranks!r}: give {len(names)} whole numbers >= 1, one per island "
            f"({', '.join(names)}), e.g. --ranks {','.join(['2'] + ['1'] * (len(names) - 1))}"
        )
    return {name: int(w) for name, w in zip(names, words, strict=True)}


@dataclass
class IslandProcess:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default_factory=time.time)  # of the current process
    done: bool = False
    exits: list[int] = field(default_factory=list)


def _pump(prefix: str, stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put((prefix, line.rstrip("\n")))


def _spawn(
    command: list[str],
    prefix: str,
    lines: queue.Queue,
    env: dict[str, str],
    spare: Spare | None = None,
    own_session: bool = False,
) -> subprocess.Popen:
    """Run `command`: in the warm spare if there is one, else in a new process; in a session
    of its own if asked (an island of several ranks, to be killed whole: `kill_session`)."""
    process = spare.take(command) if spare is not None else None
    if process is None:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
            start_new_session=own_session,
        )
    threading.Thread(target=_pump, args=(prefix, process.stdout, lines), daemon=True).start()
    return process


class LocalFleet:
    def __init__(
        self,
        config: Path,
        out: Path,
        names: list[str],
        overrides: list[str],
        per_island: dict[str, list[str]],
        resume: str,
        max_restarts: int,
        warm_spare: bool = True,
    ):
        self.config, self.out, self.names = config, out, names
        self.overrides, self.per_island = overrides, per_island
        self.resume, self.max_restarts = resume, max_restarts
        self.lines: queue.Queue = queue.Queue()
        # c10d logs every dropped store connection; a fleet expects those and reports them itself.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
        self.env.setdefault("OSTINATO_FLEET_TOKEN", secrets.token_hex(16))
        self.coordinator: subprocess.Popen | None = None
        self.islands: dict[str, IslandProcess] = {}
        self.spare = Spare(self.env) if warm_spare else None
        self.guard_events_seen = 0
        self.ranks: dict[str, int] = dict.fromkeys(names, 1)  # an island of several: torchrun
        self.log: list[dict] = []  # what the supervisor saw and did, with unix times

    def start_coordinator(self) -> str:
        command = [
            sys.executable,
            "-m",
            "ostinato",
            "fleet",
            "coordinator",
            "--bind",
            "127.0.0.1:0",
        ]
        command += ["--out", str(self.out), "--config", str(self.config), *self._fleet_overrides()]
        self.coordinator = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            bufsize=1,
        )
        seen = []
        for line in iter(self.coordinator.stdout.readline, ""):  # log lines may come first
            if line.startswith("coordinator on "):
                break
            seen.append(line)
        else:
            raise RuntimeError("the coordinator did not start:\n" + "".join(seen))
        for earlier in seen:
            self.lines.put(("coordinator", earlier.rstrip("\n")))
        threading.Thread(
            target=_pump, args=("coordinator", self.coordinator.stdout, self.lines), daemon=True
        ).start()
        first = line.strip()
        return first.removeprefix("coordinator on ")

    def _fleet_overrides(self) -> list[str]:
        """The whole recipe: the coordinator checks every island's model and rounds against it.
        Islands of several ranks cut the fleet state into as many shards as the largest has
        ranks (fleet/shards.py), unless the recipe's overrides say how many."""
        largest = max(self.ranks.values())
        given = any(o.startswith("fleet.shards=") for o in self.overrides)
        shards = [] if largest == 1 or given else [f"fleet.shards={largest}"]
        return [f"--fleet.expect={len(self.names)}", *(f"--{o}" for o in shards + self.overrides)]

    def island_command(self, name: str, address: str) -> list[str]:
        command = [sys.executable, "-m", "ostinato", "train", "--config", str(self.config)]
        if self.ranks[name] > 1:  # the supervisor restarts the whole island, not torchrun
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            launcher += [f"--nproc_per_node={self.ranks[name]}", "--max-restarts=0"]
            command = [*launcher, *command[1:]]
        command += ["--out", str(self.out / name), "--resume", self.resume]
        command += self._fleet_overrides()[1:]
        command += [f"--fleet.coordinator={address}", f"--fleet.island={name}"]
        command += [f"--{o}" for o in self.per_island.get(name, [])]
        return command

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume == "none":  # a fresh fleet: forget an earlier run's rounds and checkpoints
            (self.out / "rounds.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.out / "fleet", ignore_errors=True)
        address = self.start_coordinator()
        console.print(f"[bold]fleet[/] coordinator on {address}; islands {', '.join(self.names)}")
        for name in self.names:
            island = IslandProcess(name, self.island_command(name, address))
            several = self.ranks[name] > 1
            island.process = _spawn(island.command, name, self.lines, self.env, None, several)
            self.islands[name] = island
        self._write_pids()
        try:
            return self._supervise()
        finally:
            self.stop()

    def _supervise(self) -> int:
        while not all(i.done for i in self.islands.values()):
            self._drain(0.1)
            if self.spare is not None:
                self.spare.keep_warm()
            self.tick()
            for island in self.islands.values():
                self._check(island)
            if any(i.exits and i.exits[-1] in PERMANENT for i in self.islands.values()):
                # Bad input (2) or a refusal (3: not the fleet's recipe) fails again on a restart:
                # the fleet asked for cannot run, so stop the others rather than let them wait.
                console.print("[red]fleet: an island was refused or given bad input; stopping[/]")
                break
        self._drain(0.0)
        goodput = summarize(self.out, f"fleet {self.out.name}")
        render_table(goodput, console)
        console.print(
            f"fleet goodput {goodput.goodput:.1%}; timeline in {self.out / 'timeline.png'}, "
            f"learning curve in {self.out / 'loss.png'}"
        )
        return fleet_exit_code([i.exits[-1] if i.exits else None for i in self.islands.values()])

    def tick(self) -> None:
        """Once per supervision loop: kill islands the coordinator found hung (no heartbeat) or
        stalled (heartbeats whose step does not advance: the progress watchdog)."""
        guard_events = read_guard_log(self.out)
        for event in guard_events[self.guard_events_seen :]:
            if event["guard"] in HUNG_GUARDS:
                silent_since = event["time"] - event.get("silent_s", 0.0)
                self._kill_if_hung(event["island"], silent_since, HUNG_GUARDS[event["guard"]])
        self.guard_events_seen = len(guard_events)

    def _kill_if_hung(self, name: str, silent_since: float, how: str) -> None:
        """A process alive but silent, or beating without progress, is hung (a stalled
        collective or kernel, a stopped chip): treat it as a crash, as torchelastic's watchdog
        would. A process started after the silence began is the restart of a crashed one, not
        the silent one."""
        island = self.islands.get(name)
        if island is None or island.done or island.process.poll() is not None:
            return
        if island.started_at > silent_since:
            return
        console.print(f"[yellow]fleet: island {name} is alive but {how}; killing it[/]")
        kill_session(island.process)
        self.note("killed", name)

    def note(self, what: str, island: str, **extra) -> None:
        self.log.append({"time": time.time(), "what": what, "island": island, **extra})

    def _check(self, island: IslandProcess) -> None:
        if island.done or island.process.poll() is None:
            return
        code = island.process.returncode
        island.exits.append(code)
        self.note("exited", island.name, code=code)
        if not should_restart(code, island.restarts, self.max_restarts):
            island.done = True  # finished, refused or given bad input, or out of restarts
            return
        island.restarts += 1
        console.print(
            f"[yellow]fleet: island {island.name} exited ({code}); restart {island.restarts}[/]"
        )
        command = [*island.command]
        command[command.index("--resume") + 1] = "auto"
        several = self.ranks[island.name] > 1  # the spare is one process
        spare = None if several else self.spare
        island.process = _spawn(command, island.name, self.lines, self.env, spare, several)
        island.started_at = time.time()
        self._write_pids()
        self.note("restarted", island.name)

    def _write_pids(self) -> None:
        """OUT/islands.json: each island's current process id (a restart in a spare runs under
        the spare's command line, so this is where to look an island up)."""
        path = self.out / "islands.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pids()))
        os.replace(tmp, path)

    def _drain(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                prefix, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            console.print(f"[cyan]{prefix:>11}[/] {escape(line)}", soft_wrap=True)

    def pids(self) -> dict[str, int]:
        return {name: i.process.pid for name, i in self.islands.items() if i.process}

    def stop(self) -> None:
        if self.spare is not None:
            self.spare.stop()
        for island in self.islands.values():
            if island.process and island.process.poll() is None:
                kill_session(island.process)
        if self.coordinator and self.coordinator.poll() is None:
            self.coordinator.terminate()
            try:
                self.coordinator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.coordinator.kill()


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL an island: its session (torchrun and its ranks) when it leads one, else itself."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
            return
    except ProcessLookupError:
        return
    process.kill()


def should_restart(code: int, restarts: int, max_restarts: int) -> bool:
    """Whether an island that exited with `code` is started again, as torchrun would: a death
    by signal (negative code), a bug (1) or an unreachable peer (4) may pass on another try;
    bad input (2) and a refusal by the fleet (3) would fail the same way again."""
    return code != 0 and code not in PERMANENT and restarts < max_restarts


def fleet_exit_code(last_exits: list[int | None]) -> int:
    """The fleet's exit code from each island's last one (None: stopped by the supervisor):
    0 when all finished; the permanent code (2 or 3) that stopped the fleet; 4 when every failed
    island ran out of restarts on an unreachable peer; else 1."""
    permanent = [code for code in last_exits if code in PERMANENT]
    if permanent:
        return permanent[0]
    failed = [code for code in last_exits if code != 0]
    if not failed:
        return 0
    return UNREACHABLE if all(code == UNREACHABLE for code in failed) else 1


def parse_per_island(items: list[str], names: list[str]) -> dict[str, list[str]]:
    """`--for b:train.threads=1` lines into {island: [override, ...]}."""
    result: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or name not in names or "=" not in override:
            raise ValueError(
                f"--for {item!r}: expected ISLAND:section.key=value with ISLAND one of {', '.join(names)}"
            )
        result.setdefault(name, []).append(override.removeprefix("--"))
    return result
