"""Guards inside an island: turn a silent numerical failure into a visible, bounded one."""

from __future__ import annotations

import logging
import math

from ostinato.config import GuardsConfig

log = logging.getLogger("ostinato")


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
