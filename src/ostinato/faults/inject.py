"""Fault injection inside an island process: the faults a process can do to itself, as step hooks.

`FaultHooks` implements the trainer's step hooks (train/hooks.py); `ostinato train` builds them
from faults.schedule (`step_hooks`), so the trainer never knows a fault is there. `crash` and
`hang` are not here: a real crash is a SIGKILL and a real hang a SIGSTOP, both sent from outside
by `ostinato chaos` (faults/chaos.py). Everything else strikes from inside, at the moment its
schedule names: before inner step N (`step=`), at the first step of round R (`round=`), S seconds
after the chaos run began (storms), or from the start (slow, link):

- nan: the step's loss is multiplied by NaN; spike: the data of a window of steps is random
  tokens (faults/poison.py); bitflip: one bit of the last rank's parameters (a lone island) or of
  the island's copy of the global parameters (a fleet); slow: the step takes `factor` times as
  long; link: the member's exchanges take as long as on the given link (fleet/link.py); stall:
  the step blocks after its forward pass and never ends, while the process and its heartbeats
  live on, as a stuck kernel or collective would.

Each fault strikes once per run, even across restarts: what has struck is appended to
RUN_DIR/faults.jsonl (with when, at which step and round), which `ostinato chaos` reads back.
Once struck, slow and link hold for the rest of the run: a restarted island is as slow as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ostinato.config import Config
from ostinato.faults.bitflip import flip_high_exponent_bit
from ostinato.faults.poison import DataPoison
from ostinato.faults.spec import Fault, parse_faults, to_json
from ostinato.fleet.link import Link
from ostinato.hardware import Placement
from ostinato.jsonl import append_jsonl, read_jsonl
from ostinato.train.hooks import StepHooks
from ostinato.train.parallel import local_part
from ostinato.train.state import RankState

log = logging.getLogger("ostinato")
FROM_OUTSIDE = ("crash", "hang")
FLEET_ONLY = ("link", "stall")  # an exchange to shape; a progress watchdog to see the stall
LASTING = ("slow", "link")  # hold for the rest of the run once struck, across restarts
FIRED_FILE = "faults.jsonl"
DAY = 24 * 3600.0


def step_hooks(cfg: Config) -> StepHooks:
    """The step hooks `ostinato train` runs with: this island's scheduled faults, if any."""
    if not cfg.faults.schedule:
        return StepHooks()
    return FaultHooks(cfg, island_faults(cfg))


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
    fleet_only = sorted({f.kind for f in faults if f.kind in FLEET_ONLY})
    if fleet_only and not cfg.fleet.coordinator:
        raise ValueError(f"faults.schedule: {', '.join(fleet_only)} needs a fleet (fleet.*)")
    return [f for f in faults if f.island == cfg.fleet.island and f.kind not in FROM_OUTSIDE]


class FaultHooks(StepHooks):
    """This island's faults, struck through the trainer's step hooks.

    Every rank arms what every rank must agree on: the poisoned stretch of data (`spike`) and,
    outside a fleet, the steps after which the last rank's bit flips. The main rank's Injector
    strikes the rest at their moments (nan, slow, link, stall, a fleet's bitflip) and records
    them all."""

    def __init__(self, cfg: Config, faults: list[Fault]):
        self.cfg, self.faults = cfg, faults
        self.bitflip_steps: frozenset[int] = frozenset()
        if not cfg.fleet.coordinator:
            bitflips = [f for f in faults if f.kind == "bitflip"]
            if any(f.step is None for f in bitflips):
                raise ValueError("faults.schedule: outside a fleet, bitflip needs step=N")
            self.bitflip_steps = frozenset(f.step for f in bitflips)
        self.poison: DataPoison | None = None
        self.injector: Injector | None = None

    def start(self, state: RankState, place: Placement, out: Path) -> None:
        cfg = self.cfg
        spikes = [(f.step, int(f.param("window"))) for f in self.faults if f.kind == "spike"]
        if spikes:
            per_step = cfg.train.batch_size * cfg.train.grad_accum * place.world_size
            self.poison = DataPoison(spikes, per_step, cfg.model.vocab_size, state.stream.seed)
        if place.is_main and self.faults:
            self.injector = Injector(cfg, out, self.faults)

    def before_step(self, state: RankState, place: Placement) -> None:
        if self.injector is not None:
            round_number = state.fleet.member.round_have + 1 if state.fleet else None
            self.injector.before_step(state, state.step + 1, round_number)

    def batch(self, state, place, position, inputs, targets):
        if self.poison is not None and self.poison.covers(position):
            return self.poison.batch(position, place.rank, len(inputs), state.stream.seq_len)
        return inputs, targets

    def loss(self, state: RankState, loss: torch.Tensor) -> torch.Tensor:
        if self.injector is None:
            return loss
        if self.injector.stall_next:
            log.warning("fault stall: step %d blocks after its forward pass", state.step + 1)
            threading.Event().wait()  # never set: the step never ends
        return loss * float("nan") if self.injector.poison_next else loss

    def after_step(self, state: RankState, place: Placement, elapsed_s: float) -> None:
        if state.step in self.bitflip_steps:
            flip_rank_parameter(self.cfg.train.seed, state, place)
        slowdown = self.injector.slowdown if self.injector is not None else 1.0
        if slowdown > 1:  # emulate a slower island: its compute takes longer
            time.sleep((slowdown - 1) * elapsed_s)


class Injector:
    """Fires this island's faults at their moments; remembers what has fired in the run dir."""

    def __init__(self, cfg: Config, out: Path, faults: list[Fault]):
        self.faults = faults
        self.in_fleet = bool(cfg.fleet.coordinator)
        self.start = cfg.faults.start or time.time()
        self.path = out / FIRED_FILE
        self.fired = self._already_fired()
        self.slowdown = 1.0
        self.link = Link()  # unshaped until a `link` fault strikes
        self.poison_next = self.stall_next = False
        self.resumed = False  # whether the lasting faults of an earlier process are back on

    def _already_fired(self) -> set[str]:
        if not self.path.exists():
            return set()
        return {record["key"] for record in read_jsonl(self.path) if "key" in record}

    def before_step(self, state: RankState, step: int, round_number: int | None) -> None:
        """Strike what is due before inner step `step` (1-based) of round `round_number`."""
        self.poison_next = False
        if not self.resumed:
            # A slow chip or a degraded link is a condition, not an event: after a restart the
            # island is as slow, its link as degraded, as before (struck again, not recorded).
            self.resumed = True
            for fault in self.faults:
                if fault.kind in LASTING and _key(fault) in self.fired:
                    self._strike(fault, state)
        now = time.time()
        for fault in self.faults:
            key = _key(fault)
            if key not in self.fired and self._due(fault, step, round_number, now):
                self._strike(fault, state)
                # Remembered before the step runs: a stalled step never ends, and the restarted
                # island must not stall again.
                self._remember(fault, key, step, round_number, now, state.events)

    def _due(self, fault: Fault, step: int, round_number: int | None, now: float) -> bool:
        if fault.step is not None:
            return step >= fault.step
        if fault.round is not None:
            return round_number is not None and round_number >= fault.round
        if fault.at_s is not None:
            return now - self.start >= fault.at_s
        return True  # slow, link: from the start

    def _strike(self, fault: Fault, state: RankState) -> None:
        """spike (poisoned data) and, outside a fleet, bitflip (on the last rank) are armed on
        every rank by FaultHooks; here they are only recorded."""
        if fault.kind == "nan":
            self.poison_next = True
        elif fault.kind == "stall":
            self.stall_next = True
        elif fault.kind == "slow":
            self.slowdown = float(fault.param("factor"))
        elif fault.kind == "link":
            self.link = _degraded(self.link, fault)
            state.fleet.member.pad_exchange = self.link.pad
        elif fault.kind == "bitflip" and self.in_fleet:
            _flip_global(state)
        log.warning("fault injected: %s on island %s", fault.kind, fault.island)

    def _remember(self, fault, key, step, round_number, now, events) -> None:
        record = {"key": key, **to_json(fault), "time": now, "at_step": step}
        record["at_round"] = round_number
        append_jsonl(self.path, record)
        self.fired.add(key)
        if events is not None:
            events.mark("fault", f"{fault.kind} injected", now)


def _key(fault: Fault) -> str:
    return json.dumps(to_json(fault), sort_keys=True)


def _degraded(link: Link, fault: Fault) -> Link:
    changes: dict[str, Any] = {}
    if fault.param("bandwidth") is not None:
        changes["bits_per_s"] = fault.param("bandwidth")
    if fault.param("latency") is not None:
        changes["latency_s"] = fault.param("latency")
    if fault.param("loss") is not None:
        changes["loss"] = fault.param("loss")
    return replace(link, **changes)


def _flip_global(state: RankState) -> None:
    """A high exponent bit of the island's copy of the global parameters: the state every
    island must hold bit for bit, which the fleet's digest guard compares after each round."""
    generator = torch.Generator().manual_seed(state.step)
    target = state.fleet.member.outer.global_params.data
    index = flip_high_exponent_bit(target, generator)
    log.warning("fault bitflip: global parameter %d is now %g", index, float(target[index]))


def flip_rank_parameter(seed: int, state: RankState, place: Placement) -> None:
    """The lone island's `bitflip`: one flipped bit in one parameter of its last rank. Every
    rank draws the same parameter (from `seed` and the step); only the last flips it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + state.step)
    parameters = dict(state.model.named_parameters())
    name = list(parameters)[int(torch.randint(len(parameters), (), generator=generator))]
    victim = place.world_size - 1
    if place.rank == victim:
        target = local_part(parameters[name].data)  # a sharded parameter: this rank's shard
        index = flip_high_exponent_bit(target, generator)
        value = float(target.view(-1)[index])
        log.warning(
            "fault bitflip: after step %d, rank %d's %s[%d] is now %g",
            state.step,
            victim,
            name,
            index,
            value,
        )
    if state.events is not None:
        state.events.mark("fault", f"bitflip: {name} on rank {victim}", time.time())
