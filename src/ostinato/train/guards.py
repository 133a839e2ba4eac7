"""Guards inside an island: turn a silent numerical failure into a visible, bounded one.

Each guard is a check (non-finite values, a loss spike, ranks whose parameters differ); their
remedies that move the whole rank state (roll back, skip data) are in train/remedies.py.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter, deque
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ostinato.config import GuardsConfig
from ostinato.train.parallel import local_part

log = logging.getLogger("ostinato")
MAD_TO_STD = 1.4826  # MAD times this estimates the standard deviation of normal noise
Z_EPS = 1e-6  # keeps the z-score finite when the window's losses are all equal
WORD_TYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> same-size integer


class NonFiniteGuard:
    """A NaN or infinite loss or gradient norm skips the step; too many in a row roll back.

    Skipping keeps one bad batch from poisoning the weights (the optimizer never sees it); a
    streak means the state itself is bad, so the island returns to its last good checkpoint.
    """

    def __init__(self, cfg: GuardsConfig):
        self.cfg = cfg
        self.streak = 0

    def verdict(self, step: int, loss: float, grad_norm: float) -> str:
        """ "ok", "skip" (do not apply this step) or "rollback" (and restore the last good state)."""
        if not self.cfg.nonfinite or (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.streak = 0
            return "ok"
        self.streak += 1
        log.warning(
            "guard nonfinite: step %d has loss %s, gradient norm %s; step skipped (%d in a row)",
            step,
            loss,
            grad_norm,
            self.streak,
        )
        if self.streak >= self.cfg.max_nonfinite:
            self.streak = 0
            return "rollback"
        return "skip"


def robust_z(loss: float, window: Sequence[float]) -> float:
    """How many robust standard deviations `loss` lies above the window's median.

    Median and MAD, not mean and std: one earlier spike in the window barely moves them, and a
    loss that falls while training goes well scores below zero rather than as an outlier.
    """
    median = statistics.median(window)
    mad = statistics.median(abs(x - median) for x in window)
    return (loss - median) / (MAD_TO_STD * mad + Z_EPS)


class LossSpikeGuard:
    """A loss far above the recent ones means a bad batch or an unstable state: roll back, skip.

    The window holds the losses of recent applied steps; it changes during training, so it is
    saved in each checkpoint (state_dict) and restored with it.
    """

    def __init__(self, cfg: GuardsConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.last_z = 0.0  # of the latest spike, for its report

    def verdict(self, loss: float) -> str:
        """ "ok" (the loss joins the window) or "spike" (do not apply the step; roll back)."""
        if not self.cfg.spike or not math.isfinite(loss):
            return "ok"  # a non-finite loss is the non-finite guard's to judge
        if len(self.losses) >= self.cfg.spike_warmup:
            self.last_z = robust_z(loss, self.losses)
            if self.last_z > self.cfg.spike_z:
                return "spike"
        self.losses.append(loss)
        return "ok"

    def state_dict(self) -> dict[str, list[float]]:
        return {"losses": list(self.losses)}  # JSON keeps every bit of a float (repr)

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])


def rank_digest(model: nn.Module) -> torch.Tensor:
    """Per parameter, the sum of its raw bit patterns as integers, (n_parameters,) int64.

    Exact and order-free, so equal parameters give equal digests on any device; a flipped bit
    moves its word by a power of two, so one flip always shows. Cheap: no copy to the host.
    """
    words = [
        local_part(p.detach()).view(WORD_TYPES[p.element_size()]).sum(dtype=torch.int64)
        for p in model.parameters()
    ]
    return torch.stack(words)


def majority_rank(digests: Sequence[torch.Tensor]) -> int:
    """The first rank holding the digest most ranks hold; on a tie rank 0's digest wins."""
    keys = [tuple(d.tolist()) for d in digests]
    counts = Counter(keys)
    most = max(counts.values())
    return next(rank for rank, key in enumerate(keys) if counts[key] == most)


def check_rank_digests(
    model: nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup
) -> dict[int, int]:
    """Compare the ranks of `group`, which must hold identical parameters (DDP's replicas, or
    HSDP's replicas of one shard), and repair the odd ones: {repaired rank: rank it copied}.

    DDP never checks, so a bit flipped in one rank's memory would otherwise persist silently.
    A collective: every rank of `group` calls."""
    mine = rank_digest(model)
    digests = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(digests, mine, group=group)
    source = majority_rank(digests)
    odd = [r for r, d in enumerate(digests) if not torch.equal(d, digests[source])]
    if odd:
        copy_from_rank(model, optimizer, source, group)
    ranks = [dist.get_global_rank(group, r) for r in range(len(digests))]
    return {ranks[r]: ranks[source] for r in odd}


def copy_from_rank(
    model: nn.Module, optimizer: torch.optim.Optimizer, source: int, group: dist.ProcessGroup
) -> None:
    """Every rank of `group` takes the parameters and optimizer state of its rank `source`."""
    src = dist.get_global_rank(group, source)
    for param in model.parameters():
        dist.broadcast(local_part(param.data), src, group=group)
        for name in sorted(optimizer.state.get(param, {})):
            value = local_part(optimizer.state[param][name])
            moved = value.to(
                local_part(param).device
            )  # AdamW keeps `step` on the host; nccl: device
            dist.broadcast(moved, src, group=group)
            value.copy_(moved)
