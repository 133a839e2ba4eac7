"""The outer optimizer of DiLoCo: global parameters and Nesterov SGD over pseudo-gradients.

Global parameters live as one flat fp32 tensor on the host, whatever device the island trains
on, because only host memory crosses islands. The optimizer is torch's own SGD (nesterov=True);
a round's step is tentative until the fleet commits it, so it can be undone.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ostinato.config import FleetConfig


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters in a fixed order, tied ones once."""
    return list(dict.fromkeys(model.parameters()))


def flatten(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().flatten() for p in unique_parameters(model)])


def digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class OuterState:
    def __init__(self, model: nn.Module, cfg: FleetConfig):
        self.global_params = nn.Parameter(flatten(model))
        momentum = cfg.outer_momentum
        self.optimizer = torch.optim.SGD(
            [self.global_params], lr=cfg.outer_lr, momentum=momentum, nesterov=momentum > 0
        )
        self._undo: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def numel(self) -> int:
        return self.global_params.numel()

    def pseudo_gradient(self, model: nn.Module) -> torch.Tensor:
        """global - local: the direction the island moved, as a gradient of the global model."""
        return self.global_params.detach() - flatten(model)

    def _momentum(self) -> torch.Tensor | None:
        return self.optimizer.state.get(self.global_params, {}).get("momentum_buffer")

    def tentative_step(self, averaged: torch.Tensor) -> str:
        """Apply the averaged pseudo-gradient; returns the digest of the new global parameters."""
        momentum = self._momentum()
        self._undo = (
            self.global_params.detach().clone(),
            None if momentum is None else momentum.clone(),
        )
        self.global_params.grad = averaged
        self.optimizer.step()
        self.global_params.grad = None
        return digest(self.global_params.detach())

    def commit(self) -> None:
        self._undo = None

    def abort(self) -> None:
        if self._undo is None:
            return
        params, momentum = self._undo
        with torch.no_grad():
            self.global_params.copy_(params)
        if momentum is None:
            self.optimizer.state.pop(self.global_params, None)
        else:
            self.optimizer.state[self.global_params]["momentum_buffer"] = momentum
        self._undo = None

    def load_into(self, model: nn.Module) -> None:
        """Set the island's parameters to the global ones (start of a round)."""
        offset = 0
        with torch.no_grad():
            for param in unique_parameters(model):
                size = param.numel()
                param.copy_(self.global_params[offset : offset + size].view_as(param))
                offset += size

    def as_tensor(self) -> torch.Tensor:
        """Global parameters and momentum, one flat tensor: what a donor sends."""
        momentum = self._momentum()
        if momentum is None:
            momentum = torch.zeros_like(self.global_params)
        return torch.cat([self.global_params.detach(), momentum])

    def load_tensor(self, flat: torch.Tensor) -> None:
        params, momentum = flat.split(self.numel)
        with torch.no_grad():
            self.global_params.copy_(params)
        self.optimizer.state[self.global_params]["momentum_buffer"] = momentum.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.as_tensor()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_tensor(state["state"])
