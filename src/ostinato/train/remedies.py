"""What an island does when one of its guards (train/guards.py) fires: roll the rank state back
to the last good one, skip the data after a spike, repair a rank whose parameters differ."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ostinato.checkpoint.state import restore
from ostinato.checkpoint.store import CheckpointWriter, latest_good
from ostinato.config import Config
from ostinato.hardware import Placement
from ostinato.train.guards import check_rank_digests
from ostinato.train.parallel import strategy_of
from ostinato.train.state import RankState

log = logging.getLogger("ostinato")


def roll_back(
    cfg: Config,
    state: RankState,
    writer: CheckpointWriter,
    out: Path,
    guard: str,
    finding: str,
    remedy: str = "",
) -> None:
    """Return the model, optimizer and guards to the last good checkpoint; the data moves on."""
    detected = time.time()
    if state.events is not None:
        state.events.mark("detect", f"guard {guard}: {finding}", detected)
    if state.fleet is not None:
        # In a fleet the last good state is the round's global parameters: an older island
        # checkpoint would turn the rounds since into a bogus pseudo-gradient.
        state.fleet.load_global()
        log.warning(
            "guard %s: %s; rolled back to the round's global parameters%s", guard, finding, remedy
        )
        if state.events is not None:
            state.events.span("recovery", detected, time.time())
        return
    writer.wait()  # a save still in flight may be the newest good state
    path = latest_good(out / "checkpoints")
    if path is None:
        log.warning("guard %s: %s; no checkpoint to roll back to%s", guard, finding, remedy)
        return
    tensors = state.checkpoint_tensors()
    meta = restore(
        path, {k: v for k, v in tensors.items() if k != "outer_optimizer"}, cfg.to_dict()
    )
    state.restore_guards(meta)
    step = meta["train_state"]["step"]
    log.warning("guard %s: %s; rolled back to step %d%s", guard, finding, step, remedy)
    if state.events is not None:  # the work since that checkpoint is lost
        state.events.span("discarded", state.saved_at, detected)
        state.events.span("recovery", detected, time.time())
    state.saved_at = time.time()


def skip_spike(
    cfg: Config,
    state: RankState,
    writer: CheckpointWriter,
    out: Path,
    loss: float,
    world_size: int,
) -> None:
    """The loss spiked: roll back, and move the data past the window that follows (as PaLM did
    by hand), since the batches that caused a spike tend to come in runs."""
    guard = state.spike_guard
    finding = (
        f"step {state.step} loss {loss:.4f} is {guard.last_z:.1f} robust z-scores above the "
        f"median of the last {len(guard.losses)}"
    )
    skip = cfg.guards.spike_skip
    state.stream.skip(skip * cfg.train.batch_size * cfg.train.grad_accum * world_size)
    roll_back(cfg, state, writer, out, "spike", finding, f", skipping {skip} steps of data")


def island_repairs(repaired: dict[int, int]) -> dict[int, int]:
    """Every rank's repair, known to every rank: HSDP compares within each shard's replicas, so
    the main rank may not be among those that found one."""
    mine = torch.tensor([repaired.get(dist.get_rank(), -1)])
    sources = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sources, mine)
    return {rank: int(s) for rank, s in enumerate(sources) if int(s) >= 0}


def guard_digests(state: RankState, place: Placement, replicas: dist.ProcessGroup) -> None:
    """Compare the parameter digests of the ranks that hold the same values (`replicas`), and
    repair any rank that holds other ones."""
    repaired = island_repairs(check_rank_digests(state.model, state.optimizer, replicas))
    if not place.is_main:
        return
    for rank, source in repaired.items():
        finding = f"rank {rank}'s parameters differ from the island's"
        log.warning("guard digest: %s; repaired from rank %d", finding, source)
        if state.events is not None:
            state.events.mark("detect", f"guard digest: {finding}", time.time())


def out_of_memory_advice(cfg: Config, place: Placement) -> str:
    """What to change when a rank's device memory runs out, instead of the allocator's dump."""
    strategy = strategy_of(cfg.parallel, place.world_size, bool(cfg.fleet.coordinator))
    return (
        f"rank {place.rank} ran out of {place.device.type} memory ({strategy} on "
        f"{place.world_size} rank(s)). Shard the model over more ranks (parallel.strategy = "
        f"fsdp), recompute activations (parallel.activation_checkpointing = full), or lower "
        f"train.batch_size (now {cfg.train.batch_size}; raise train.grad_accum to keep the "
        f"tokens per step); `ostinato plan` estimates what fits."
    )
