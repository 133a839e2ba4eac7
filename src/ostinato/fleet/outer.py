"""The outer optimizer of DiLoCo: global parameters and Nesterov SGD over pseudo-gradients.

Global parameters live as one flat fp32 tensor on the host, whatever device the island trains
on, because only host memory crosses islands. The optimizer is torch's own SGD (nesterov=True);
a round's step is tentative until the fleet commits it, so it can be undone.

For Streaming DiLoCo the flat tensor is cut into fragments (fleet/streaming.py): each is a
Parameter viewing its slice, so a round steps one fragment's parameters and momentum and leaves
the others alone (torch's SGD skips a parameter without a gradient). One fragment, the default,
is plain DiLoCo.
"""

from __future__ import annotations

import hashlib
import threading

import torch
from torch import nn

from ostinato.config import FleetConfig
from ostinato.fleet.streaming import fragment_cuts

# The outer rate that "Scaling Laws for DiLoCo" (arXiv 2503.09799, Table 4: H = 30, 20 tokens
# per parameter) found best by replicas; it did not depend on model size. Between 4 and 8
# replicas it is interpolated.
AUTO_OUTER_LR = {1: 0.4, 2: 0.6, 3: 0.6, 4: 0.6, 5: 0.65, 6: 0.7, 7: 0.75, 8: 0.8}
ASSUMED_ISLANDS = 3  # fleet.expect = 0 ("whoever is there"): the 2-4 band


def outer_lr_of(cfg: FleetConfig) -> tuple[float, str]:
    """The outer learning rate a fleet of this config uses, and why: the number set, or for
    "auto" the paper's best for the islands the fleet expects (fleet.expect). H is not taken
    into account: the sweep behind the table ran at H = 30 only."""
    if not isinstance(cfg.outer_lr, str):
        return float(cfg.outer_lr), "fleet.outer_lr"
    islands = cfg.expect or ASSUMED_ISLANDS
    lr = AUTO_OUTER_LR[min(islands, max(AUTO_OUTER_LR))]
    expected = f"{cfg.expect} islands expected" if cfg.expect else "fleet.expect = 0: 2-4 assumed"
    return lr, f"auto: {expected} (Scaling Laws for DiLoCo, Table 4)"


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters in a fixed order, tied ones once."""
    return list(dict.fromkeys(model.parameters()))


def flatten(model: nn.Module) -> torch.Tensor:
    return _flat(unique_parameters(model))


def _flat(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().flatten() for p in params])


def digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class OuterState:
    """The outer state of a whole model's flat parameters, or (`of_range`) of one fleet shard
    of them. It touches no model."""

    def __init__(self, model: nn.Module, cfg: FleetConfig):
        sizes = [p.numel() for p in unique_parameters(model)]
        offsets = [sum(sizes[:cut]) for cut in fragment_cuts(sizes, cfg.fragments)]
        self._setup(flatten(model), list(zip(offsets[:-1], offsets[1:], strict=True)), cfg)

    @classmethod
    def of_range(
        cls, values: torch.Tensor, bounds: list[tuple[int, int]], cfg: FleetConfig
    ) -> OuterState:
        """The outer state of a range of the flat parameters (a fleet shard, fleet/shards.py,
        which moves values between it and the model): `values` its global parameters, `bounds`
        each fragment's [lo, hi) within it (empty where a fragment lies outside)."""
        state = cls.__new__(cls)
        state._setup(values.clone(), bounds, cfg)
        return state

    def _setup(self, values: torch.Tensor, bounds: list[tuple[int, int]], cfg: FleetConfig):
        self.bounds = bounds  # flat [lo, hi) of each fragment
        self.global_params = values
        self.parts = [nn.Parameter(self.global_params[lo:hi]) for lo, hi in self.bounds]
        momentum = cfg.outer_momentum
        self.optimizer = torch.optim.SGD(
            self.parts, lr=outer_lr_of(cfg)[0], momentum=momentum, nesterov=momentum > 0
        )
        self._undo: list[tuple[int, torch.Tensor, torch.Tensor | None]] | None = None
        # The training thread reads the global parameters (rollback, heal) while a streaming
        # exchange may step them in the background: each operation is atomic.
        self.lock = threading.RLock()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        """The rate the coordinator resolved for the whole fleet (given at admission)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def numel(self) -> int:
        return self.global_params.numel()

    def span(self, fragment: int | None) -> tuple[int, int]:
        """[lo, hi) of a fragment in the flat tensor; None: the whole of it."""
        if fragment is None:
            return 0, self.numel
        return self.bounds[fragment]

    def size(self, fragment: int | None) -> int:
        lo, hi = self.span(fragment)
        return hi - lo

    def _fragments(self, fragment: int | None) -> range:
        return range(len(self.parts)) if fragment is None else range(fragment, fragment + 1)

    def _momentum_of(self, index: int) -> torch.Tensor | None:
        return self.optimizer.state.get(self.parts[index], {}).get("momentum_buffer")

    def _momentum(self) -> torch.Tensor | None:
        """The whole momentum, zeros where a fragment has none yet; None before any step."""
        buffers = [self._momentum_of(i) for i in range(len(self.parts))]
        if all(b is None for b in buffers):
            return None
        zeros = [torch.zeros_like(p.detach()) for p in self.parts]
        return torch.cat([z if b is None else b for b, z in zip(buffers, zeros, strict=True)])

    def tentative_step(self, averaged: torch.Tensor, fragment: int | None = None) -> str:
        """Apply the averaged pseudo-gradient of a fragment (None: of all of them); returns the
        digest of the new global parameters, all of them."""
        with self.lock:
            chosen = self._fragments(fragment)
            self._undo = []
            base = self.bounds[chosen[0]][0]
            for i in chosen:
                momentum = self._momentum_of(i)
                saved = None if momentum is None else momentum.clone()
                self._undo.append((i, self.parts[i].detach().clone(), saved))
                lo, hi = self.bounds[i]
                self.parts[i].grad = averaged[lo - base : hi - base]
            self.optimizer.step()
            for i in chosen:
                self.parts[i].grad = None
            return digest(self.global_params)

    def tentative_average(self, averaged: torch.Tensor) -> str:
        """A warm-start round (fleet.warm_start_steps): global -= the averaged pseudo-gradient
        of the whole model, which makes the global parameters the islands' mean (outer lr 1, no
        momentum: synchronous training's average); undone like a step. Returns the digest."""
        with self.lock:
            self._undo = [
                (i, self.parts[i].detach().clone(), self._momentum_of(i))
                for i in range(len(self.parts))
            ]
            with torch.no_grad():
                self.global_params.sub_(averaged)
            return digest(self.global_params)

    def commit(self) -> None:
        self._undo = None

    def abort(self) -> None:
        with self.lock:
            for i, params, momentum in self._undo or []:
                with torch.no_grad():
                    self.parts[i].copy_(params)
                if momentum is None:
                    self.optimizer.state.pop(self.parts[i], None)
                else:
                    self.optimizer.state[self.parts[i]]["momentum_buffer"] = momentum
            self._undo = None

    def as_tensor(self) -> torch.Tensor:
        """Global parameters and momentum, one flat tensor: what a donor sends."""
        with self.lock:
            momentum = self._momentum()
            if momentum is None:
                momentum = torch.zeros_like(self.global_params)
            return torch.cat([self.global_params, momentum])

    def load_tensor(self, flat: torch.Tensor) -> None:
        params, momentum = flat.split(self.numel)
        with torch.no_grad(), self.lock:
            self.global_params.copy_(params)
            for part, (lo, hi) in zip(self.parts, self.bounds, strict=True):
                self.optimizer.state[part]["momentum_buffer"] = momentum[lo:hi].clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.as_tensor()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_tensor(state["state"])
