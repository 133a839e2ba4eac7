"""Fleet shards: the fleet state cut so that no rank holds all of it.

The flat parameter vector is cut into `fleet.shards` = K contiguous ranges of about equal size
(element ranges, not tensor boundaries), the same cut on every island whatever its rank count.
Rank r of an island of N ranks owns the shards k with k % N == r: it alone holds their global
parameters, outer momentum and error-feedback residual, and it alone compresses, exchanges and
applies them, over a gloo group of its own per shard with the owners of shard k on the other
islands. So islands of 4, 2 and 1 ranks exchange shard k with each other, an island of N ranks
exchanges on N connections at once, and with K >= N each rank holds about 1/N of the state.

The model's values reach a shard one parameter at a time: a sharded (FSDP) parameter is gathered
whole (`full_tensor`, a collective every rank of the island calls in the same order) and only
the owned slices kept; the global values go back into the model one parameter at a time, each
slice broadcast by its owner over the island's gloo group.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ostinato.config import FleetConfig
from ostinato.fleet.compress import ErrorFeedback
from ostinato.fleet.outer import OuterState, digest, unique_parameters
from ostinato.fleet.streaming import fragment_cuts
from ostinato.train.parallel import shard_rows


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of `shards` contiguous ranges of `numel` elements, ceil-sized (as
    torch.chunk cuts: the last ones may be shorter, or empty in a tiny model)."""
    size = -(-numel // shards)
    return [(min(k * size, numel), min((k + 1) * size, numel)) for k in range(shards)]


def owned_shards(shards: int, rank: int, ranks: int) -> list[int]:
    """The fleet shards rank `rank` of an island of `ranks` ranks holds (round-robin)."""
    return [k for k in range(shards) if k % ranks == rank]


def owner_of(shard: int, ranks: int) -> int:
    return shard % ranks


def island_digest(shard_digests: list[str]) -> str:
    """An island's digest: of its one shard, or the hash of its K shard digests in shard order,
    which an island of any rank count reproduces."""
    if len(shard_digests) == 1:
        return shard_digests[0]
    return hashlib.sha256("".join(shard_digests).encode()).hexdigest()[:16]


def fleet_checkpoint_dir(base: Path, shard: int, shards: int) -> Path:
    """Where the fleet checkpoints of shard `shard` go: base itself for an uncut fleet state,
    else one directory per shard (each shard's rounds written, checksummed and kept alone)."""
    return base if shards == 1 else base / f"shard-{shard}"


def fragment_bounds(sizes: list[int], fragments: int) -> list[tuple[int, int]]:
    """[lo, hi) of each Streaming DiLoCo fragment in the flat vector (whole tensors)."""
    cuts = fragment_cuts(sizes, fragments)
    offsets = [sum(sizes[:cut]) for cut in cuts]
    return list(zip(offsets[:-1], offsets[1:], strict=True))


def clip(bounds: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Each range of `bounds` cut to [lo, hi), in coordinates from lo (empty where outside)."""
    clipped = []
    for a, b in bounds:
        start = min(max(a, lo), hi)
        clipped.append((start - lo, max(start, min(b, hi)) - lo))
    return clipped


class ShardSet:
    """This rank's fleet shards: an OuterState and an ErrorFeedback per owned shard, and the
    way between them and the island's model (a collective over the island's ranks)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: FleetConfig,
        rank: int = 0,
        ranks: int = 1,
        group: dist.ProcessGroup | None = None,
    ):
        self.rank, self.ranks, self.group = rank, ranks, group
        sizes = [p.numel() for p in unique_parameters(model)]
        self.numel, self.count = sum(sizes), cfg.shards
        self.bounds = shard_bounds(self.numel, cfg.shards)
        self.mine = owned_shards(cfg.shards, rank, ranks)
        self.fragments = fragment_bounds(sizes, cfg.fragments)
        values = self.read(model)
        self.outer = {
            k: OuterState.of_range(values[k], clip(self.fragments, *self.bounds[k]), cfg)
            for k in self.mine
        }
        self.feedback = {
            k: ErrorFeedback(self.size(k), cfg.compression, cfg.block) for k in self.mine
        }
        self.prepared: dict[int, torch.Tensor] = {}  # pseudo-gradients of the next round

    def size(self, shard: int) -> int:
        lo, hi = self.bounds[shard]
        return hi - lo

    def span(self, fragment: int | None) -> tuple[int, int]:
        return (0, self.numel) if fragment is None else self.fragments[fragment]

    def fragment_size(self, shard: int, fragment: int | None) -> int:
        """Elements of `fragment` (None: all) in `shard`: what the shard sends in its round."""
        lo, hi = clip([self.span(fragment)], *self.bounds[shard])[0]
        return hi - lo

    # --- between the model and the shards ----------------------------------------------------

    def read(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """The model's current values of each owned shard, fp32 on the host. A collective for a
        sharded model: every rank gathers each parameter in turn and keeps its slices."""
        values = {k: torch.empty(self.size(k)) for k in self.mine}
        offset = 0
        for param in unique_parameters(model):
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            flat = whole.detach().reshape(-1)
            end = offset + flat.numel()
            for k in self.mine:
                lo, hi = max(offset, self.bounds[k][0]), min(end, self.bounds[k][1])
                if lo < hi:
                    start = self.bounds[k][0]
                    values[k][lo - start : hi - start] = flat[lo - offset : hi - offset].float()
            offset = end
        return values

    def write(self, model: nn.Module, fragment: int | None, mix: float = 0.0) -> None:
        """local = mix * local + (1 - mix) * global over a fragment's parameters (None: all),
        on every rank of the island (each slice comes from the rank that owns it)."""
        lo, hi = self.span(fragment)
        offset = 0
        with torch.no_grad():
            for param in unique_parameters(model):
                end = offset + param.numel()
                if lo <= offset and end <= hi:  # fragments are whole tensors
                    self._write_one(param, self._assemble(offset, end), mix)
                offset = end

    def _assemble(self, start: int, end: int) -> torch.Tensor:
        """The global values of flat [start, end), each slice from its owner."""
        values = torch.empty(end - start)
        for k, (lo, hi) in enumerate(self.bounds):
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            piece = values[a - start : b - start]
            if k in self.outer:
                with self.outer[k].lock:
                    piece.copy_(self.outer[k].global_params[a - lo : b - lo])
            if self.ranks > 1:
                dist.broadcast(piece, owner_of(k, self.ranks), group=self.group)
        return values

    @staticmethod
    def _write_one(param: torch.Tensor, values: torch.Tensor, mix: float) -> None:
        new = values.view(param.shape)
        if isinstance(param, DTensor):  # this rank's rows only
            target, first = shard_rows(param)
            new = new[first : first + target.shape[0]]
        else:
            target = param.data
        new = new.to(target.device, target.dtype)
        if mix == 0.0:
            target.copy_(new)
        else:
            target.lerp_(new, 1.0 - mix)

    def prepare(self, model: nn.Module, fragment: int | None) -> None:
        """Keep each owned shard's pseudo-gradient (global - local) of the next round's fragment
        (a collective: every rank calls)."""
        values = self.read(model)
        self.prepared = {}
        for k in self.mine:
            lo, hi = clip([self.span(fragment)], *self.bounds[k])[0]
            with self.outer[k].lock:
                self.prepared[k] = self.outer[k].global_params[lo:hi] - values[k][lo:hi]

    # --- state --------------------------------------------------------------------------------

    def digests(self) -> dict[int, str]:
        return {k: digest(self.outer[k].global_params) for k in self.mine}

    def set_lr(self, lr: float) -> None:
        for outer in self.outer.values():
            outer.set_lr(lr)

    def commit(self, keep_error: bool) -> None:
        for k in self.mine:
            self.outer[k].commit()
            if keep_error:
                self.feedback[k].commit()
            else:
                self.feedback[k].reset()  # the round's work was left out: do not carry its error

    def abort(self) -> None:
        for outer in self.outer.values():
            outer.abort()

    def reset_feedback(self) -> None:
        for feedback in self.feedback.values():
            feedback.reset()

    def tensor_state(self, shards: list[int] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Outer state and residual of the owned shards (or of `shards` of them), by shard name
        (an N-rank save resumes on M ranks: each rank loads the shards it owns there)."""
        return {
            f"shard{k}": {**self.outer[k].state_dict(), **self.feedback[k].state_dict()}
            for k in (self.mine if shards is None else shards)
        }

    def load_tensor_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for k in self.mine:
            self.load_shard(k, state[f"shard{k}"])

    def load_shard(self, shard: int, state: dict[str, torch.Tensor]) -> None:
        self.outer[shard].load_state_dict(state)
        self.feedback[shard].load_state_dict(state)

    def empty_state(self, shard: int) -> dict[str, torch.Tensor]:
        """Tensors of one shard's saved state, to load into (fleet checkpoints)."""
        return {
            "state": torch.empty(2 * self.size(shard)),
            "residual": torch.empty(self.size(shard)),
        }

    def held_bytes(self) -> int:
        """Bytes of fleet state on this rank (global parameters, momentum, residual)."""
        total = 0
        for k in self.mine:
            outer = self.outer[k]
            total += outer.global_params.nbytes + self.feedback[k].residual.nbytes
            buffers = (outer._momentum_of(i) for i in range(len(outer.parts)))
            total += sum(b.nbytes for b in buffers if b is not None)
        return total
