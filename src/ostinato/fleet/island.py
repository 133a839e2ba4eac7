"""An island's part in the fleet: its identity, the fleet checkpoint, and per-round syncing.

`FleetIsland` is what the island trainer holds when it trains in a fleet: it owns the island's
FleetMember, the island's gloo group for fleet state, the round clock and the writer of fleet
checkpoints, and it is given only the config sections it needs. The functions above it are pure
arithmetic of a recipe (rounds, inner steps, the island's data seed, the fleet fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import nn

from ostinato.checkpoint.store import (
    CheckpointWriter,
    committed_checkpoints,
    load_tensors,
    read_meta,
    verify,
)
from ostinato.config import CheckpointConfig, FleetConfig, ModelConfig, budget_of
from ostinato.data.stream import TokenStream
from ostinato.fleet.member import FleetMember, RoundOutcome
from ostinato.fleet.shards import fleet_checkpoint_dir
from ostinato.fleet.streaming import InFlight, send_in_background
from ostinato.hardware import Placement

log = logging.getLogger("ostinato")


def total_rounds(fleet: FleetConfig, steps: int) -> int:
    """Rounds in the run: the warm start's (one per step of fleet.warm_start_steps), then
    fleet.rounds, else the rest of train.steps (`steps`) over H, per fragment."""
    kind, amount = budget_of(fleet)
    warm = fleet.warm_start_steps
    if fleet.rounds:
        return warm + fleet.rounds
    if kind == "seconds":
        raise ValueError("fleet.rounds must be set (> 0) when fleet.budget is seconds:T")
    return warm + max(1, (steps - warm) // int(amount)) * fleet.fragments


def total_inner_steps(fleet: FleetConfig, steps: int) -> int:
    """Nominal inner steps of a fleet run, for the progress bar (time budgets may differ)."""
    kind, amount = budget_of(fleet)
    if kind == "seconds":
        return steps
    warm = fleet.warm_start_steps
    return warm + (total_rounds(fleet, steps) - warm) * int(amount) // fleet.fragments


def island_seed(fleet: FleetConfig, data_seed: int) -> int:
    """Each island reads its own data stream (stream id = island name)."""
    if not fleet.coordinator:
        return data_seed
    return data_seed + zlib.crc32(fleet.island.encode()) % 1_000_003


def recipe_fingerprint(model: ModelConfig, fleet: FleetConfig, steps: int) -> dict[str, Any]:
    """The part of the fingerprint a recipe alone fixes (the coordinator's, given --config)."""
    return {
        "model": dataclasses.asdict(model),
        "compression": fleet.compression,
        "block": fleet.block,
        "outer_lr": fleet.outer_lr,
        "outer_momentum": fleet.outer_momentum,
        "fragments": fleet.fragments,
        "warm_start_steps": fleet.warm_start_steps,
        "shards": fleet.shards,
        "rounds": total_rounds(fleet, steps),
    }


def fingerprint(
    model: ModelConfig, fleet: FleetConfig, steps: int, tokenizer: Tokenizer, warm_start: str = ""
) -> dict[str, Any]:
    """What must be equal across the fleet; the coordinator names any field that is not.
    `warm_start`: the checksum of the checkpoint every island starts from (fleet.warm_start;
    empty: the seeded init), so islands that start from different parameters are refused."""
    tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    recipe = recipe_fingerprint(model, fleet, steps)
    return {**recipe, "tokenizer": tokenizer_hash, "warm_start": warm_start}


def time_budget_step(steps: int, rounds: int, round_have: int, clock: RoundClock) -> int:
    """Where the learning-rate schedule stands on a time budget: an island runs as many steps
    as its speed allows, so `steps` (train.steps) is spread over the fleet's `rounds` and the
    schedule follows the rounds done (and this round's share, by the steps of the island's last
    round), to end with the run. Steps, not seconds, so every rank of an island reads the same."""
    per_round = clock.last_steps or steps / rounds
    done = round_have + min(1.0, clock.steps / per_round)
    return min(steps, int(steps * done / rounds))


def agree(flag: bool, group: dist.ProcessGroup) -> bool:
    """The island's leader decides; its other ranks follow (over the island's gloo group)."""
    value = torch.tensor([float(flag)])
    dist.broadcast(value, 0, group=group)
    return bool(value.item())


class RoundClock:
    """Inner steps, tokens and seconds since this island's round began; the steps of its last
    round; and the round whose exchange is still in flight (fleet.overlap).

    A round begins when the last one ended (reset), and a process's first round at its first
    inner step (begin): a time budget is inner work, so the seconds a process spends joining,
    being healed or setting up do not count against it (they could leave a round one step)."""

    def __init__(self) -> None:
        self.in_flight: InFlight | None = None
        self.steps, self.last_steps, self.tokens = 0, 0, 0
        self.started: float | None = None  # not yet: begin() at the process's first step

    def begin(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def reset(self) -> None:
        self.last_steps = self.steps or self.last_steps
        self.steps, self.tokens, self.started = 0, 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def seconds(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started


class Timeline(Protocol):
    """Where the island's spans of wall-clock time go (train/metrics.py's EventLog)."""

    def span(self, kind: str, start: float, end: float) -> None: ...


class FleetIsland:
    """One island in a fleet, as its trainer sees it: the member that speaks the fleet protocol
    (only the leader rank's talks to the coordinator; every rank holds its own fleet shards),
    the rounds it ends, and the fleet checkpoints its ranks write, each of its own shards.

    `steps` is train.steps (the run's length, which fixes the rounds and the lr schedule), `out`
    the island's run directory, `recipe` the resolved config written into fleet checkpoints."""

    def __init__(
        self,
        cfg: FleetConfig,
        checkpoint: CheckpointConfig,
        steps: int,
        member: FleetMember,
        model: nn.Module,
        stream: TokenStream,
        place: Placement,
        out: Path,
        recipe: dict[str, Any],
    ):
        self.cfg, self.checkpoint, self.steps = cfg, checkpoint, steps
        self.member, self.model, self.stream, self.place = member, model, stream, place
        self.out, self.recipe = out, recipe
        self.rounds = total_rounds(cfg, steps)
        self.clock = RoundClock()
        self.group = dist.new_group(backend="gloo") if place.world_size > 1 else None
        self.writers: dict[int, CheckpointWriter] = {}  # of fleet checkpoints, by shard
        self.events: Timeline | None = None  # the leader's
        self.dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.parent / "fleet"
        # every rank: when no donor is left, the fleet checkpoint (fleet/member.py)
        member.restore_state = self.restore_shards

    # --- state and checkpoints --------------------------------------------------------------

    def tensor_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Outer state and error feedback of this rank's fleet shards: the island checkpoint's
        `outer_optimizer` part (by shard name, so it resumes on another rank count)."""
        return self.member.shards.tensor_state()

    def load_tensor_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.member.shards.load_tensor_state(state)

    def shard_dir(self, shard: int) -> Path:
        return fleet_checkpoint_dir(self.dir / "checkpoints", shard, self.member.shards.count)

    def resume_from_fleet_checkpoint(self) -> bool:
        """Start from the fleet's latest durable checkpoint, if any (no island checkpoint).
        Every rank of the island calls: each restores its shards, then the model takes them."""
        found = self.restore_shards()
        if found:
            self.member.shards.write(self.model, None)
        return found

    def restore_shards(self) -> bool:
        """This rank's shards from the newest fleet checkpoint round that every shard has and
        that verifies in every shard this island owns (the ranks agree on it), with the data
        position; sets the round held. Whether one was found."""
        shards, crew = self.member.shards, self.member.crew
        rounds = [
            {read_round(p): p for p in committed_checkpoints(self.shard_dir(k))}
            for k in range(shards.count)
        ]
        common = sorted(set.intersection(*(set(r) for r in rounds)), reverse=True)
        for number in common:
            good = all(verify(rounds[k][number]) is None for k in shards.mine)
            if crew.agree(good):
                self._load_round(number, {k: rounds[k][number] for k in shards.mine}, rounds)
                return True
        return False

    def _load_round(self, number: int, mine: dict[int, Path], rounds: list[dict]) -> None:
        shards = self.member.shards
        for k, path in mine.items():
            state = {"outer_optimizer": {f"shard{k}": shards.empty_state(k)}}
            load_tensors(path, state, no_dist=True)  # read alone: each rank its own shards
            shards.load_shard(k, state["outer_optimizer"][f"shard{k}"])
        self.member.round_have = number
        meta = read_meta(rounds[0][number])
        position = (meta["fleet"].get("data") or {}).get(self.cfg.island)
        if position:
            self.stream.load_state_dict(position)
        log.info("fleet: resumed from fleet checkpoint %s (round %d)", rounds[0][number], number)

    def join(self) -> None:
        """Join the fleet: the leader speaks for the island, its other ranks follow it."""
        if self.place.is_main:
            self.member.start(self.model)
        else:
            self.member.follow_start(self.model)

    def _write_fleet_checkpoint(self, outcome: RoundOutcome) -> float:
        """Start writing the fleet checkpoint of the round just committed, each rank its own
        shards, in the background (the island trains on); returns the seconds training
        stalled. close() waits for it."""
        meta = {
            "parts": ["outer_optimizer"],
            "config": self.recipe,
            "fleet": {"round": outcome.round, "data": outcome.data},
            "train_state": {"step": 0},
        }
        stall = 0.0
        for k in self.member.shards.mine:
            if k not in self.writers:
                config = CheckpointConfig(keep=3, async_save=True)
                self.writers[k] = CheckpointWriter(self.shard_dir(k), config, sync_ranks=False)
            tensors = {"outer_optimizer": self.member.shards.tensor_state([k])}
            stall += self.writers[k].save(outcome.round, tensors, meta)
        log.info("fleet: writing the fleet checkpoint of round %d", outcome.round)
        return stall

    def close(self) -> None:
        """Wait for the fleet checkpoint in flight; leave the fleet."""
        for writer in self.writers.values():
            writer.wait()
        self.member.close()

    # --- the inner loop's side --------------------------------------------------------------

    def schedule_step(self, step: int) -> int:
        """The step at which the learning-rate schedule stands: the fleet's, not the island's
        own `step` (which a restart sets back to its checkpoint while the heal brings its
        parameters up to the fleet's round). On a step budget, one step per warm-start round
        and H per round after it, held (or in flight), and this round's steps, which is `step`
        itself for an island never struck; on a time budget, time_budget_step."""
        member, clock = self.member, self.clock
        if member.budget_kind == "steps":
            rounds = member.round_have + (clock.in_flight is not None)
            warm = min(rounds, member.warm_rounds)
            return warm + (rounds - warm) * math.ceil(member.budget) + clock.steps
        return time_budget_step(self.steps, self.rounds, member.round_have, clock)

    def training(self, step: int) -> None:
        """Before each inner step: the heartbeats say the island trains, at `step` so far. From
        here on the progress guard counts the time without a new step (it ignores the time spent
        starting, healing or syncing, whose beats say so), so a step that never ends is seen
        even when it is the first after a round or a restart."""
        self.clock.begin()
        self.member.heartbeat.progress(step)
        self.member.serve_asked_heal()  # the leader's member only: the others hold no keys

    def stepped(self, step: int, tokens: int, tokens_per_s: float) -> None:
        """After inner step `step`: count it in the round, and beat it (the coordinator's
        progress guard sees the step advance)."""
        self.clock.add(tokens)
        self.member.heartbeat.progress(step, tokens_per_s=tokens_per_s)

    def due(self, step: int) -> bool:
        """After inner step `step`: whether the island ends its round, or takes in the result of
        the exchange it overlapped with its last fleet.overlap steps (earlier when the next step
        saves a checkpoint, which must not hold a round half done)."""
        clock = self.clock
        if clock.in_flight is not None and (
            clock.steps >= self.cfg.overlap or self._saves_next(step)
        ):
            return True
        due = self.member.round_due(clock.steps, clock.seconds())
        if self.group is not None and self.member.budget_kind == "seconds":
            # Each rank's clock reads differently: the leader's decides, or the ranks would part
            # ways (one syncing, the others in the next step's all-reduce) and hang.
            due = agree(due, self.group)
        return due

    def _saves_next(self, step: int) -> bool:
        every = self.checkpoint.every
        return bool(every) and (step + 1) % every == 0

    def load_global(self) -> None:
        """The model takes the global parameters of the round the island holds (a roll-back;
        every rank calls)."""
        self.member.shards.write(self.model, None)

    def sync(self, step: int) -> bool:
        """Take in the round in flight, if any; end this island's round if it is due: the
        leader syncs with the fleet, its other ranks follow, in the background with
        fleet.overlap. True after the last."""
        clock, member, place = self.clock, self.member, self.place
        if clock.in_flight is not None:
            final = self._land()
            if final or not member.round_due(clock.steps, clock.seconds()):
                return final
        warm = member.warm(member.round_have + 1)  # warm-start rounds are never overlapped
        overlap = self.cfg.overlap > 0 and not self._saves_next(step) and not warm
        if overlap and place.is_main:  # the run's final round is not: the fleet ends in agreement
            overlap = not member.total_rounds or member.round_have + 1 < member.total_rounds
        if self.cfg.overlap > 0 and self.group is not None:
            overlap = agree(overlap, self.group)
        member.prepare(self.model)  # every rank, its shards (a collective on a sharded model)
        data, tokens = self.stream.state_dict(), clock.tokens
        if overlap:
            clock.in_flight = send_in_background(lambda: self._round(tokens, data))
            clock.reset()
            return False
        wall = time.time()
        outcome = self._round(tokens, data)
        if self.events is not None:
            self.events.span("waiting", wall, wall + outcome.waiting_s)
        clock.reset()
        return self._take(outcome, wall + outcome.waiting_s)

    def _round(self, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        """The island's side of one round: the leader's exchange, which it ends for the ranks
        that followed it, with what the round came to."""
        member = self.member
        if not self.place.is_main:
            ended = member.crew.follow()
            member.round_have, member.role = ended.pop("round_have"), ended.pop("role")
            return RoundOutcome(**ended)
        outcome = member.exchange(tokens, data)
        ended = dataclasses.asdict(outcome) | {"round_have": member.round_have, "role": member.role}
        member.crew.end(ended)
        return outcome

    def _land(self) -> bool:
        """Wait for the exchange in flight and merge its result into the model (fleet.mix)."""
        flight, self.clock.in_flight = self.clock.in_flight, None
        return self._take(flight.land(), time.time(), self.cfg.mix)

    def _take(self, outcome: RoundOutcome, exchanged: float, mix: float = 0.0) -> bool:
        """Every rank: the model takes the round's result; the fleet checkpoint if it is this
        island's to write. Whether the round was the fleet's last."""
        self.member.take(self.model, outcome, mix)
        if self.events is not None:
            kind = "exchange" if outcome.committed else "recovery"
            self.events.span(kind, exchanged, time.time())
        if outcome.checkpoint_by_me:
            started = time.time()
            stall = self._write_fleet_checkpoint(outcome)
            if self.events is not None:
                self.events.span("checkpoint", started, started + stall)
        return outcome.final


def read_round(path: Path) -> int:
    """The round of a fleet checkpoint (its directory's step number)."""
    return int(path.name.removeprefix("step_"))
