"""Faults the island trainer injects into itself, to prove that its guards catch them.

`nan@step=N` poisons a step's loss, `spike@step=N,window=W` a stretch of the data stream (see
ostinato.faults.poison), `bitflip@step=N` one number in the last rank's parameters. Other kinds
are the chaos harness's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ostinato.config import Config
from ostinato.faults.bitflip import flip_high_exponent_bit
from ostinato.faults.inject import Injector, island_faults
from ostinato.faults.poison import DataPoison
from ostinato.hardware import Placement

if TYPE_CHECKING:
    from ostinato.train.trainer import Island

log = logging.getLogger("ostinato")


def inject_faults(cfg: Config, island: Island, place: Placement, out: Path) -> None:
    """Arm this island's scheduled faults.

    Every rank arms what every rank must agree on: the poisoned stretch of data (`spike`) and,
    outside a fleet, the step after which the last rank's bit flips. The main rank's Injector
    strikes the rest at their moments (nan, slow, link, a fleet's bitflip) and records them all.
    """
    faults = island_faults(cfg)
    if not cfg.fleet.coordinator:
        bitflips = [f for f in faults if f.kind == "bitflip"]
        if any(f.step is None for f in bitflips):
            raise ValueError("faults.schedule: outside a fleet, bitflip needs step=N")
        island.bitflip_steps = frozenset(f.step for f in bitflips)
    spikes = [(f.step, int(f.param("window"))) for f in faults if f.kind == "spike"]
    if spikes:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * place.world_size
        island.poison = DataPoison(spikes, per_step, cfg.model.vocab_size, island.stream.seed)
    if place.is_main and faults:
        island.injector = Injector(cfg, out, faults)


def strike_due_faults(island: Island) -> bool:
    """Before each step (main rank): strike what is due. True if this step's loss is poisoned."""
    if island.injector is None:
        return False
    round_number = island.member.round_have + 1 if island.member is not None else None
    island.injector.before_step(island, island.step + 1, round_number)
    return island.injector.poison_next


def inject_bitflip(cfg: Config, island: Island, place: Placement) -> None:
    """The `bitflip` fault: one flipped bit in one parameter of the island's last rank."""
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + island.step)
    parameters = dict(island.model.named_parameters())
    name = list(parameters)[int(torch.randint(len(parameters), (), generator=generator))]
    victim = place.world_size - 1
    if place.rank == victim:
        index = flip_high_exponent_bit(parameters[name].data, generator)
        value = float(parameters[name].data.view(-1)[index])
        log.warning(
            "fault bitflip: after step %d, rank %d's %s[%d] is now %g",
            island.step,
            victim,
            name,
            index,
            value,
        )
    if island.events is not None:
        island.events.mark("fault", f"bitflip: {name} on rank {victim}", time.time())
