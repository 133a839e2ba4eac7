"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication").

The model's parameters are split into P fragments, contiguous groups of whole tensors of about
equal size. Rounds come every H/P inner steps and round r synchronises fragment (r-1) % P, so
each fragment is synchronised once every H steps, fragment p at offset (p+1)·H/P (torchft's
offsets), and each exchange carries ~1/P of the parameters: the peak bandwidth drops P-fold.
The schedule is a pure function of the round number, so every island, the coordinator and a
healed joiner agree on it without saying so. The run's final round synchronises every fragment,
so the fleet ends, as plain DiLoCo does, with every island on the same global parameters.

With `overlap` = tau > 0 a round's exchange runs in a background thread while the island trains
tau more inner steps; then the fragment's local parameters, which moved on meanwhile, are
merged with the new global ones: local = mix · local + (1 - mix) · global, the paper's merge
with mixing factor alpha (torchft's `fragment_update_alpha`, where 0 means plain replacement).
The final round is never overlapped. P = 1 and tau = 0 is plain DiLoCo, bit for bit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def fragment_cuts(sizes: list[int], fragments: int) -> list[int]:
    """Tensor indices where fragments start, plus len(sizes): P contiguous groups of tensors
    whose element counts are about equal (each cut is the tensor boundary nearest k/P of the
    total, keeping every fragment non-empty)."""
    if not 1 <= fragments <= len(sizes):
        raise ValueError(
            f"fleet.fragments = {fragments}: must be between 1 and the model's "
            f"{len(sizes)} parameter tensors (a fragment is a group of whole tensors)"
        )
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    cuts = [0]
    for k in range(1, fragments):
        target = k * prefix[-1] / fragments
        allowed = range(cuts[-1] + 1, len(sizes) - (fragments - k) + 1)
        cuts.append(min(allowed, key=lambda i: (abs(prefix[i] - target), i)))
    return [*cuts, len(sizes)]


def fragment_of(
    round_number: int, fragments: int, total_rounds: int, warm_rounds: int = 0
) -> int | None:
    """The fragment that round `round_number` synchronises; None: all of them (a warm-start
    round, or the final round of a run with several fragments). The fleet's first `warm_rounds`
    rounds are its warm start (fleet.warm_start_steps, one inner step each); the fragments'
    schedule begins after them."""
    if round_number <= warm_rounds:
        return None
    if fragments == 1:
        return 0
    if total_rounds and round_number >= total_rounds:
        return None
    return (round_number - warm_rounds - 1) % fragments


@dataclass
class InFlight:
    """A round whose exchange runs in the background while the island trains on."""

    started: float = field(default_factory=time.time)
    thread: threading.Thread | None = None  # only on an island's leader
    result: dict[str, Any] = field(default_factory=dict)

    def land(self) -> Any:
        """Wait for the exchange; its outcome (None on the ranks that do not exchange)."""
        if self.thread is None:
            return None
        self.thread.join()
        if "error" in self.result:
            raise self.result["error"]
        return self.result["outcome"]


def send_in_background(exchange: Callable[[], Any]) -> InFlight:
    """Run `exchange` (the member's side of one round) in its own thread."""
    flight = InFlight()

    def run() -> None:
        try:
            flight.result["outcome"] = exchange()
        except Exception as exc:  # noqa: BLE001 - re-raised in the training thread by land()
            flight.result["error"] = exc

    flight.thread = threading.Thread(target=run, daemon=True, name="ostinato-streaming")
    flight.thread.start()
    return flight
