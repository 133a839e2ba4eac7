"""The trainer's step hooks: the one place where something outside the trainer reaches into a step.

The trainer calls these at fixed points of every inner step and knows nothing of what is behind
them. By default they do nothing. Fault injection (ostinato.faults.inject.FaultHooks) is the one
implementation: it is chosen at the entry point (`ostinato train`, from faults.schedule), the way
torchft's tests inject failures from outside the manager, so no fault lives in the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ostinato.hardware import Placement

if TYPE_CHECKING:  # the state module never imports this one: no cycle
    from ostinato.train.state import RankState


class StepHooks:
    """No-op hooks; an implementation overrides what it needs. Called on every rank."""

    def start(self, state: RankState, place: Placement, out: Path) -> None:
        """Once, when the rank's state is built (resumed, and joined to its fleet), before the
        first step of this process."""

    def before_step(self, state: RankState, place: Placement) -> None:
        """Before inner step state.step + 1."""

    def batch(
        self,
        state: RankState,
        place: Placement,
        position: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch read at global stream position `position`, on the host, each
        (batch_size, seq_len); returns the (inputs, targets) the step trains on."""
        return inputs, targets

    def loss(self, state: RankState, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss after the forward pass, before the backward; returns the loss to
        differentiate. Whatever happens here happens inside the step."""
        return loss

    def after_step(self, state: RankState, place: Placement, elapsed_s: float) -> None:
        """After inner step state.step was applied (or skipped) and its guards acted, before the
        ranks compare digests; `elapsed_s` is the step's wall time so far."""
