"""Glue between the island trainer and the fleet: identity, checkpoints and per-round syncing."""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn

from ostinato.checkpoint.store import CheckpointWriter, latest_good, load_tensors, read_meta
from ostinato.config import CheckpointConfig, Config, budget_of
from ostinato.fleet.member import FleetMember, RoundOutcome
from ostinato.fleet.streaming import InFlight, send_in_background

log = logging.getLogger("ostinato")


def total_rounds(cfg: Config) -> int:
    kind, amount = budget_of(cfg.fleet)
    if cfg.fleet.rounds:
        return cfg.fleet.rounds
    if kind == "seconds":
        raise ValueError("fleet.rounds must be set (> 0) when fleet.budget is seconds:T")
    return max(1, cfg.train.steps // int(amount)) * cfg.fleet.fragments


def island_seed(cfg: Config) -> int:
    """Each island reads its own data stream (stream id = island name)."""
    if not cfg.fleet.coordinator:
        return cfg.data.seed
    return cfg.data.seed + zlib.crc32(cfg.fleet.island.encode()) % 1_000_003


def fingerprint(cfg: Config, tokenizer: Tokenizer) -> dict[str, Any]:
    """What must be equal across the fleet; the coordinator names any field that is not."""
    tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    return {**recipe_fingerprint(cfg), "tokenizer": tokenizer_hash}


def recipe_fingerprint(cfg: Config) -> dict[str, Any]:
    """The part of the fingerprint a recipe alone fixes (the coordinator's, given --config)."""
    return {
        "model": cfg.to_dict()["model"],
        "compression": cfg.fleet.compression,
        "block": cfg.fleet.block,
        "outer_lr": cfg.fleet.outer_lr,
        "outer_momentum": cfg.fleet.outer_momentum,
        "fragments": cfg.fleet.fragments,
        "rounds": total_rounds(cfg),
    }


def fleet_dir(cfg: Config, out: Path) -> Path:
    return Path(cfg.fleet.checkpoint_dir) if cfg.fleet.checkpoint_dir else out.parent / "fleet"


def tensor_state(member: FleetMember) -> dict[str, torch.Tensor]:
    return {**member.outer.state_dict(), **member.feedback.state_dict()}


def load_tensor_state(member: FleetMember, state: dict[str, torch.Tensor]) -> None:
    member.outer.load_state_dict(state)
    member.feedback.load_state_dict(state)


def empty_tensor_state(member: FleetMember) -> dict[str, torch.Tensor]:
    return {k: torch.empty_like(v) for k, v in tensor_state(member).items()}


def resume_from_fleet_checkpoint(
    cfg: Config, out: Path, member: FleetMember, model: nn.Module, stream
) -> bool:
    """Without an island checkpoint, start from the fleet's latest durable checkpoint, if any."""
    found = latest_good(fleet_dir(cfg, out) / "checkpoints")
    if found is None:
        return False
    meta = read_meta(found)
    state = {"outer_optimizer": empty_tensor_state(member)}
    # Read alone: in a multi-rank island only the leader restores when it (re)joins.
    load_tensors(found, state, no_dist=True)
    load_tensor_state(member, state["outer_optimizer"])
    member.outer.load_into(model)
    member.round_have = meta["fleet"]["round"]
    position = (meta["fleet"].get("data") or {}).get(cfg.fleet.island)
    if position:
        stream.load_state_dict(position)
    log.info("fleet: resumed from fleet checkpoint %s (round %d)", found, member.round_have)
    return True


def join(cfg: Config, out: Path, member: FleetMember, model: nn.Module, stream) -> None:
    """Join the fleet. An island that comes back after the fleet finished (a late restart)
    ends with the fleet's final parameters, from the final fleet checkpoint."""

    def restore_state() -> int:  # when no donor is left: the fleet checkpoint, else our own
        resume_from_fleet_checkpoint(cfg, out, member, model, stream)
        return member.round_have

    member.restore_state = restore_state
    member.start(model)
    if member.active:
        return
    final = total_rounds(cfg)
    deadline = time.monotonic() + cfg.fleet.connect_timeout_s
    while member.round_have < final and time.monotonic() < deadline:
        if not resume_from_fleet_checkpoint(cfg, out, member, model, stream):
            time.sleep(0.2)  # the donor writes the final checkpoint just after the commit
        elif member.round_have < final:
            time.sleep(0.2)


def write_fleet_checkpoint(cfg: Config, out: Path, island, outcome: RoundOutcome) -> float:
    """Start writing the fleet checkpoint of the round just committed, in the background (the
    island trains on); returns the seconds training stalled. The trainer waits for the write
    before the process ends."""
    if island.fleet_writer is None:
        root = fleet_dir(cfg, out) / "checkpoints"
        config = CheckpointConfig(keep=3, async_save=True)
        island.fleet_writer = CheckpointWriter(root, config, sync_ranks=False)
    member = island.member
    meta = {
        "parts": ["outer_optimizer"],
        "config": cfg.to_dict(),
        "fleet": {"round": outcome.round, "data": outcome.data},
        "train_state": {"step": 0},
    }
    stall = island.fleet_writer.save(outcome.round, {"outer_optimizer": tensor_state(member)}, meta)
    log.info("fleet: writing the fleet checkpoint of round %d", outcome.round)
    return stall


def total_inner_steps(cfg: Config) -> int:
    """Nominal inner steps of a fleet run, for the progress bar (time budgets may differ)."""
    kind, amount = budget_of(cfg.fleet)
    if kind == "seconds":
        return cfg.train.steps
    return total_rounds(cfg) * int(amount) // cfg.fleet.fragments


class RoundClock:
    """Inner steps, tokens and seconds since this island's round began; the steps of its last
    round; and the round whose exchange is still in flight (fleet.overlap)."""

    def __init__(self) -> None:
        self.in_flight: InFlight | None = None
        self.steps, self.last_steps = 0, 0
        self.reset()

    def reset(self) -> None:
        self.last_steps = self.steps or self.last_steps
        self.steps, self.tokens, self.started = 0, 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def schedule_step(cfg: Config, island, clock: RoundClock) -> int:
    """The step at which the learning-rate schedule stands. Counted in the island's own steps,
    except on a time budget: there an island runs as many steps as its speed allows, so
    train.steps is spread over the fleet's rounds and the schedule follows the rounds done
    (and this round's share, by the steps of the island's last round), to end with the run.
    Steps, not seconds, so every rank of an island reads the same rate."""
    member = island.member
    if member is None or member.budget_kind == "steps":
        return island.step
    total = total_rounds(cfg)
    per_round = clock.last_steps or cfg.train.steps / total
    done = member.round_have + min(1.0, clock.steps / per_round)
    return min(cfg.train.steps, int(cfg.train.steps * done / total))


def fleet_due(cfg: Config, island, clock: RoundClock) -> bool:
    """After an inner step: whether the island ends its round, or takes in the result of the
    exchange it overlapped with its last fleet.overlap steps (earlier when the next step saves
    a checkpoint, which must not hold a round half done)."""
    if clock.in_flight is not None and (
        clock.steps >= cfg.fleet.overlap or saves_next(cfg, island.step)
    ):
        return True
    due = island.member.round_due(clock.steps, clock.seconds())
    if island.fleet_group is not None and island.member.budget_kind == "seconds":
        # Each rank's clock reads differently: the leader's decides, or the ranks would part
        # ways (one syncing, the others in the next step's all-reduce) and hang.
        due = agree(due, island.fleet_group)
    return due


def saves_next(cfg: Config, step: int) -> bool:
    return bool(cfg.checkpoint.every) and (step + 1) % cfg.checkpoint.every == 0


def sync_round(cfg: Config, island, place, out: Path, clock: RoundClock) -> bool:
    """Take in the round in flight, if any; end this island's round if it is due: the leader
    syncs with the fleet, in the background with fleet.overlap. Returns True after the last."""
    if clock.in_flight is not None:
        final = land_round(cfg, island, place, out, clock)
        if final or not island.member.round_due(clock.steps, clock.seconds()):
            return final
    member = island.member
    overlap = cfg.fleet.overlap > 0 and not saves_next(cfg, island.step)
    if overlap and place.is_main:  # the run's final round is not: the fleet ends in agreement
        overlap = not member.total_rounds or member.round_have + 1 < member.total_rounds
    if cfg.fleet.overlap > 0 and place.world_size > 1:
        overlap = agree(overlap, island.fleet_group)
    if overlap:
        clock.in_flight = InFlight()
        if place.is_main:
            pseudo_gradient = member.pseudo_gradient(island.model)
            data, tokens = island.stream.state_dict(), clock.tokens
            clock.in_flight = send_in_background(
                lambda: member.exchange(pseudo_gradient, tokens, data)
            )
        clock.reset()
        return False
    outcome = None
    if place.is_main:
        wall = time.time()
        outcome = member.sync(island.model, clock.tokens, island.stream.state_dict())
        record_round(cfg, island, out, outcome, wall, wall + outcome.waiting_s)
    clock.reset()
    return share_round(island, outcome, place.world_size)


def land_round(cfg: Config, island, place, out: Path, clock: RoundClock) -> bool:
    """Wait for the exchange in flight and merge its result into the model (fleet.mix)."""
    flight, clock.in_flight = clock.in_flight, None
    wall = time.time()
    outcome = flight.land()
    if outcome is not None:
        island.member.take(island.model, outcome, cfg.fleet.mix)
        record_round(cfg, island, out, outcome, wall, wall)
    return share_round(island, outcome, place.world_size)


def record_round(cfg: Config, island, out: Path, outcome: RoundOutcome, wall, waited) -> None:
    """Events of the island's blocking part of a round (`wall` to now), fleet checkpoint."""
    if island.events is not None:
        island.events.span("waiting", wall, waited)
        kind = "exchange" if outcome.committed else "recovery"
        island.events.span(kind, waited, time.time())
    if outcome.checkpoint_by_me:
        started = time.time()
        stall = write_fleet_checkpoint(cfg, out, island, outcome)
        if island.events is not None:
            island.events.span("checkpoint", started, started + stall)


def agree(flag: bool, group: dist.ProcessGroup) -> bool:
    """The island's leader decides; its other ranks follow (over the island's gloo group)."""
    value = torch.tensor([float(flag)])
    dist.broadcast(value, 0, group=group)
    return bool(value.item())


def share_round(island, outcome: RoundOutcome | None, world_size: int) -> bool:
    """Inside a multi-rank island the leader syncs; the others take its state. Returns final."""
    if world_size == 1:
        return bool(outcome and outcome.final)
    final = agree(bool(outcome and outcome.final), island.fleet_group)
    share_fleet_state(island)
    return final


def share_fleet_state(island) -> None:
    """Every rank of a multi-rank island takes the leader's fleet state: the round it holds,
    whether the fleet has finished, the global parameters and outer-optimizer state, and the
    model's parameters. So a rank's roll-back to the round's global parameters, and its share
    of an island checkpoint, are the leader's. The fleet state lives in host memory and goes
    over the island's gloo group; the parameters over the island's own backend."""
    member, group = island.member, island.fleet_group
    header = torch.tensor([float(member.round_have), float(member.active)], dtype=torch.float64)
    dist.broadcast(header, 0, group=group)
    member.round_have = int(header[0].item())
    if not header[1].item():
        member.role = "finished"
    state = tensor_state(member)
    for tensor in state.values():
        dist.broadcast(tensor, 0, group=group)
    load_tensor_state(member, state)
    for param in island.model.parameters():
        dist.broadcast(param.data, 0)
