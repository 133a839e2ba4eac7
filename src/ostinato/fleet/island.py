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

from ostinato.checkpoint.store import CheckpointWriter, latest_good, load_tensors, read_meta
from ostinato.config import CheckpointConfig, FleetConfig, ModelConfig, budget_of
from ostinato.data.stream import TokenStream
from ostinato.fleet.member import FleetMember, RoundOutcome
from ostinato.fleet.streaming import InFlight, send_in_background
from ostinato.hardware import Placement
from ostinato.train.parallel import pull, push

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
    (only the leader rank's talks to the coordinator), the rounds it ends, the fleet state its
    ranks share, and the fleet checkpoints it writes.

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
        self.writer: CheckpointWriter | None = None  # of fleet checkpoints, once one is due
        self.events: Timeline | None = None  # the leader's
        self.dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.parent / "fleet"
        # A sharded island trains `shards`; `model` is then its whole copy in host memory, on
        # which the exchange runs: gathered before each round, scattered into the shards after.
        self.shards: nn.Module | None = None

    # --- state and checkpoints --------------------------------------------------------------

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """Outer optimizer and error feedback: the island checkpoint's `outer_optimizer` part."""
        return {**self.member.outer.state_dict(), **self.member.feedback.state_dict()}

    def load_tensor_state(self, state: dict[str, torch.Tensor]) -> None:
        self.member.outer.load_state_dict(state)
        self.member.feedback.load_state_dict(state)

    def resume_from_fleet_checkpoint(self) -> bool:
        """Start from the fleet's latest durable checkpoint, if any (no island checkpoint)."""
        found = latest_good(self.dir / "checkpoints")
        if found is None:
            return False
        meta = read_meta(found)
        state = {
            "outer_optimizer": {k: torch.empty_like(v) for k, v in self.tensor_state().items()}
        }
        # Read alone: in a multi-rank island only the leader restores when it (re)joins.
        load_tensors(found, state, no_dist=True)
        self.load_tensor_state(state["outer_optimizer"])
        self.member.outer.load_into(self.model)
        self.member.round_have = meta["fleet"]["round"]
        position = (meta["fleet"].get("data") or {}).get(self.cfg.island)
        if position:
            self.stream.load_state_dict(position)
        log.info(
            "fleet: resumed from fleet checkpoint %s (round %d)", found, self.member.round_have
        )
        return True

    def join(self) -> None:
        """Join the fleet (the leader). An island that comes back after the fleet finished (a
        late restart) ends with the fleet's final parameters, from the final fleet checkpoint."""
        member = self.member

        def restore_state() -> int:  # when no donor is left: the fleet checkpoint, else our own
            self.resume_from_fleet_checkpoint()
            return member.round_have

        member.restore_state = restore_state
        member.start(self.model)
        if member.active:
            return
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while member.round_have < self.rounds and time.monotonic() < deadline:
            if not self.resume_from_fleet_checkpoint():
                time.sleep(0.2)  # the donor writes the final checkpoint just after the commit
            elif member.round_have < self.rounds:
                time.sleep(0.2)

    def _write_fleet_checkpoint(self, outcome: RoundOutcome) -> float:
        """Start writing the fleet checkpoint of the round just committed, in the background
        (the island trains on); returns the seconds training stalled. close() waits for it."""
        if self.writer is None:
            config = CheckpointConfig(keep=3, async_save=True)
            self.writer = CheckpointWriter(self.dir / "checkpoints", config, sync_ranks=False)
        meta = {
            "parts": ["outer_optimizer"],
            "config": self.recipe,
            "fleet": {"round": outcome.round, "data": outcome.data},
            "train_state": {"step": 0},
        }
        tensors = {"outer_optimizer": self.tensor_state()}
        stall = self.writer.save(outcome.round, tensors, meta)
        log.info("fleet: writing the fleet checkpoint of round %d", outcome.round)
        return stall

    def close(self) -> None:
        """Wait for the fleet checkpoint in flight; leave the fleet."""
        if self.writer is not None:
            self.writer.wait()
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
        """The model takes the global parameters of the round the island holds (a roll-back)."""
        self.member.outer.load_into(self.model)
        self.scatter()

    def gather(self) -> None:
        """A sharded island's host copy takes what its ranks trained (every rank calls)."""
        if self.shards is not None:
            pull(self.shards, self.model)

    def scatter(self) -> None:
        """The shards take their rows of the host copy (after a round, a heal, a roll-back)."""
        if self.shards is not None:
            push(self.model, self.shards)

    def sync(self, step: int) -> bool:
        """Take in the round in flight, if any; end this island's round if it is due: the
        leader syncs with the fleet, in the background with fleet.overlap. True after the last."""
        clock, member, place = self.clock, self.member, self.place
        self.gather()
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
        if overlap:
            clock.in_flight = InFlight()
            if place.is_main:
                pseudo_gradient = member.pseudo_gradient(self.model)
                data, tokens = self.stream.state_dict(), clock.tokens
                clock.in_flight = send_in_background(
                    lambda: member.exchange(pseudo_gradient, tokens, data)
                )
            clock.reset()
            return False
        outcome = None
        if place.is_main:
            wall = time.time()
            outcome = member.sync(self.model, clock.tokens, self.stream.state_dict())
            self._record(outcome, wall, wall + outcome.waiting_s)
        clock.reset()
        return self._share_round(outcome)

    def _land(self) -> bool:
        """Wait for the exchange in flight and merge its result into the model (fleet.mix)."""
        flight, self.clock.in_flight = self.clock.in_flight, None
        wall = time.time()
        outcome = flight.land()
        if outcome is not None:
            self.member.take(self.model, outcome, self.cfg.mix)
            self._record(outcome, wall, wall)
        return self._share_round(outcome)

    def _record(self, outcome: RoundOutcome, wall: float, waited: float) -> None:
        """Events of the island's blocking part of a round (`wall` to now), fleet checkpoint."""
        if self.events is not None:
            self.events.span("waiting", wall, waited)
            kind = "exchange" if outcome.committed else "recovery"
            self.events.span(kind, waited, time.time())
        if outcome.checkpoint_by_me:
            started = time.time()
            stall = self._write_fleet_checkpoint(outcome)
            if self.events is not None:
                self.events.span("checkpoint", started, started + stall)

    def _share_round(self, outcome: RoundOutcome | None) -> bool:
        """Inside a multi-rank island the leader syncs; the others take its state. Returns
        whether the round was the fleet's last."""
        if self.group is None:
            return bool(outcome and outcome.final)
        final = agree(bool(outcome and outcome.final), self.group)
        self.share_fleet_state()
        return final

    def share_fleet_state(self) -> None:
        """Every rank of a multi-rank island takes the leader's fleet state: the round it holds,
        whether the fleet has finished, the global parameters and outer-optimizer state, and the
        model's parameters. So a rank's roll-back to the round's global parameters, and its
        share of an island checkpoint, are the leader's. The fleet state lives in host memory and
        goes over the island's gloo group; the parameters over the island's own backend."""
        member, group = self.member, self.group
        header = torch.tensor([float(member.round_have), float(member.active)], dtype=torch.float64)
        dist.broadcast(header, 0, group=group)
        member.round_have = int(header[0].item())
        if not header[1].item():
            member.role = "finished"
        state = self.tensor_state()
        for tensor in state.values():
            dist.broadcast(tensor, 0, group=group)
        self.load_tensor_state(state)
        # the parameters: the model's over the island's backend, or the host copy over gloo
        host = self.shards is not None
        for param in self.model.parameters():
            dist.broadcast(param.data, 0, group=group if host else None)
        self.scatter()
