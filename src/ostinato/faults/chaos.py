"""`ostinato chaos`: a local fleet under a fault schedule, and the proof that it survived.

The supervisor (fleet/local.py) runs the fleet; this module adds the faults a process cannot do
to itself: a crash is a SIGKILL and a hang a SIGSTOP, sent when the island reaches the step or
round the schedule names, or at a storm's wall-clock time, and only to an island that is up (it
trained a step since it last started). The other kinds strike from inside the islands
(faults/inject.py). Afterwards every fault is matched with the guard that caught it into
chaos.json and a table (faults/survival.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ostinato.config import Config, budget_of
from ostinato.faults.inject import FROM_OUTSIDE
from ostinato.faults.spec import Fault, parse_faults, to_json
from ostinato.faults.survival import (
    build_report,
    console,
    final_state,
    print_survival_table,
    verdict,
    write_report,
)
from ostinato.fleet.island import total_inner_steps, total_rounds
from ostinato.fleet.local import IslandProcess, LocalFleet
from ostinato.jsonl import append_jsonl

RESTART_S = 10.0  # what a restart is assumed to take when a storm is checked for a quorum


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
        # One strike per process: a killed one can live on for a while (in a write it cannot
        # leave, on a loaded machine), and a second fault sent to it could not be seen apart.
        self.signalled: list[Any] = []

    def tick(self) -> None:
        super().tick()
        for strike in self.strikes:
            if strike.sent_at is None:
                self._maybe_strike(strike)

    def struck(self) -> list[dict[str, Any]]:
        """The crashes and hangs sent, as chaos.json records them."""
        return [
            {
                **to_json(s.fault),
                "time": s.sent_at,
                "at_step": s.at_step,
                "at_round": s.at_round,
            }
            for s in self.strikes
            if s.sent_at is not None
        ]

    def _maybe_strike(self, strike: Strike) -> None:
        island = self.islands.get(strike.fault.island)
        if island is None or not is_up(island, self.out / island.name):
            return
        if any(island.process is process for process in self.signalled):
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
        self.signalled.append(island.process)
        strike.sent_at, strike.at_step, strike.at_round = time.time(), step, round_number
        self.note(f"{fault.kind} sent", island.name, step=step, round=round_number)
        mark_fault(self.out / island.name, island.name, fault.kind, strike.sent_at)
        console.print(f"[red]chaos: {fault.kind} sent to island {island.name} at step {step}[/]")


def is_up(island: IslandProcess, run_dir: Path) -> bool:
    """Whether the island's current process is running and has trained a step since it started.

    Its heartbeats began before that step, so the coordinator knows it alive, and a crash or
    hang now is one its heartbeat guard can see. One sent earlier (while a restarted island is
    still starting, before the coordinator has seen it come back) would be seen by nothing but
    the supervisor that sent it, which is no detection."""
    if island.done or island.process is None or island.process.poll() is not None:
        return False
    path = run_dir / "metrics.jsonl"
    return path.exists() and path.stat().st_mtime > island.started_at


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
    append_jsonl(run_dir / "events.jsonl", record)  # the island it kills may have torn a line


# --- the run ------------------------------------------------------------------------------------


def parse_schedule(spec: str, names: list[str], cfg: Config) -> list[Fault]:
    """Every fault checked before anything starts, against the run's rounds and inner steps;
    storms last until the run ends."""
    if not spec.strip():
        raise ValueError("--faults is empty; give a schedule such as crash@island=b,step=40")
    kind, _ = budget_of(cfg.fleet)
    return parse_faults(
        spec,
        names,
        steps=total_inner_steps(cfg.fleet, cfg.train.steps) if kind == "steps" else None,
        rounds=total_rounds(cfg.fleet, cfg.train.steps),
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


REFERENCE_SEEDS = 3  # fault-free fleets run by --compare: their spread is what chance moves


def reference_fleets(
    config: Path,
    out: Path,
    names: list[str],
    overrides: list[str],
    per_island: dict[str, list[str]],
    cfg: Config,
) -> dict[int, float | None]:
    """The same fleet without faults, for REFERENCE_SEEDS initialisations (train.seed, then the
    next ones): the first is the chaos run's own reference, the spread of all of them says how
    far a fault-free run's final loss moves by chance. On a step budget each trains the tokens
    the chaos run trains; a time budget trains what the machine allows, so it is refused."""
    if budget_of(cfg.fleet)[0] != "steps":
        raise ValueError(
            "chaos --compare compares on equal tokens: give a step budget "
            f"(--fleet.budget=steps:H), not {cfg.fleet.budget!r}"
        )
    losses = {}
    for seed in range(cfg.train.seed, cfg.train.seed + REFERENCE_SEEDS):
        console.print(f"[bold]chaos[/]: the fault-free reference fleet, train.seed={seed}")
        folder = out / "reference" / f"seed{seed}"
        seeded = [*overrides, f"train.seed={seed}"]
        # no island dies in it: no restart to keep a warm spare for
        reference = LocalFleet(config, folder, names, seeded, per_island, "none", 3, False)
        if reference.run() != 0:
            raise RuntimeError("a fault-free reference fleet failed; see its output above")
        losses[seed] = final_state(folder, names)[0]
    return losses


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
    references = reference_fleets(config, out, names, overrides, per_island, cfg) if compare else {}
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
    report = build_report(out, names, faults, fleet.struck(), start, code)
    report["reference_loss"] = references.get(cfg.train.seed)
    report["reference_losses"] = {str(seed): loss for seed, loss in references.items()}
    report["supervisor"] = [{**e, "time": round(e["time"] - start, 3)} for e in fleet.log]
    path = write_report(out, report)
    print_survival_table(report)
    console.print(f"chaos report in {path}")
    return verdict(report)
