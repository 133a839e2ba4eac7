"""Fault injection inside an island process: the faults a process can do to itself.

`crash` and `hang` are not here: a real crash is a SIGKILL and a real hang a SIGSTOP, both sent
from outside by `ostinato chaos` (faults/chaos.py). Everything else strikes from inside, at the
moment its schedule names: before inner step N (`step=`), at the first step of round R
(`round=`), S seconds after the chaos run began (storms), or from the start (slow, link).

Each fault strikes once per run, even across restarts: what has struck is appended to
RUN_DIR/faults.jsonl (with when, at which step and round), which `ostinato chaos` reads back.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ostinato.config import Config
from ostinato.faults.bitflip import flip_high_exponent_bit
from ostinato.faults.spec import Fault, parse_faults, to_json

log = logging.getLogger("ostinato")
FROM_OUTSIDE = ("crash", "hang")
FIRED_FILE = "faults.jsonl"
DAY = 24 * 3600.0


def island_faults(cfg: Config) -> list[Fault]:
    """This island's faults from the schedule, checked against the fleet's island names."""
    if not cfg.faults.schedule:
        return []
    names = [n.strip() for n in cfg.faults.islands.split(",") if n.strip()]
    chaos = bool(names)
    names = names or [cfg.fleet.island]
    faults = parse_faults(
        cfg.faults.schedule,
        names,
        steps=None if cfg.fleet.coordinator else cfg.train.steps,
        duration_s=DAY,  # a storm without duration= strikes until the run ends
    )
    outside = sorted({f.kind for f in faults if f.kind in FROM_OUTSIDE})
    if outside and not chaos:
        raise ValueError(
            f"faults.schedule: {', '.join(outside)} is sent from outside the process "
            "(SIGKILL, SIGSTOP); run the schedule with `ostinato chaos`"
        )
    fleet_only = sorted({f.kind for f in faults if f.kind in ("link",)})
    if fleet_only and not cfg.fleet.coordinator:
        raise ValueError(f"faults.schedule: {', '.join(fleet_only)} needs a fleet (fleet.*)")
    return [f for f in faults if f.island == cfg.fleet.island and f.kind not in FROM_OUTSIDE]


class Injector:
    """Fires this island's faults at their moments; remembers what has fired in the run dir."""

    def __init__(self, cfg: Config, out: Path, faults: list[Fault]):
        self.faults = faults
        self.in_fleet = bool(cfg.fleet.coordinator)
        self.start = cfg.faults.start or time.time()
        self.path = out / FIRED_FILE
        self.fired = self._already_fired()
        self.slowdown = cfg.fleet.slowdown
        self.poison_next = False

    def _already_fired(self) -> set[str]:
        if not self.path.exists():
            return set()
        lines = self.path.read_text().splitlines()
        return {json.loads(line)["key"] for line in lines if line.strip().endswith("}")}

    def before_step(self, island, step: int, round_number: int | None) -> None:
        """Strike what is due before inner step `step` (1-based) of round `round_number`."""
        self.poison_next = False
        now = time.time()
        for fault in self.faults:
            key = _key(fault)
            if key not in self.fired and self._due(fault, step, round_number, now):
                self._strike(fault, island)
                self._remember(fault, key, step, round_number, now, island.events)

    def _due(self, fault: Fault, step: int, round_number: int | None, now: float) -> bool:
        if fault.step is not None:
            return step >= fault.step
        if fault.round is not None:
            return round_number is not None and round_number >= fault.round
        if fault.at_s is not None:
            return now - self.start >= fault.at_s
        return True  # slow, link: from the start

    def _strike(self, fault: Fault, island) -> None:
        """spike (poisoned data) and, outside a fleet, bitflip (on the last rank) are armed on
        every rank by the trainer; here they are only recorded."""
        if fault.kind == "nan":
            self.poison_next = True
        elif fault.kind == "slow":
            self.slowdown = float(fault.param("factor"))
        elif fault.kind == "link":
            island.member.link = _degraded(island.member.link, fault)
        elif fault.kind == "bitflip" and self.in_fleet:
            _flip_global(island)
        log.warning("fault injected: %s on island %s", fault.kind, fault.island)

    def _remember(self, fault, key, step, round_number, now, events) -> None:
        record = {"key": key, **to_json(fault), "time": now, "at_step": step}
        record["at_round"] = round_number
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.fired.add(key)
        if events is not None:
            events.mark("fault", f"{fault.kind} injected", now)


def _key(fault: Fault) -> str:
    return json.dumps(to_json(fault), sort_keys=True)


def _degraded(link, fault: Fault):
    changes: dict[str, Any] = {}
    if fault.param("bandwidth") is not None:
        changes["bits_per_s"] = fault.param("bandwidth")
    if fault.param("latency") is not None:
        changes["latency_s"] = fault.param("latency")
    if fault.param("loss") is not None:
        changes["loss"] = fault.param("loss")
    return replace(link, **changes)


def _flip_global(island) -> None:
    """A high exponent bit of the island's copy of the global parameters: the state every
    island must hold bit for bit, which the fleet's digest guard compares after each round."""
    generator = torch.Generator().manual_seed(island.step)
    target = island.member.outer.global_params.data
    index = flip_high_exponent_bit(target, generator)
    log.warning("fault bitflip: global parameter %d is now %g", index, float(target[index]))
