"""Checkpoint intervals of checkpoint-restart: Young (1974), Daly (2006) and first-order waste.

Pure functions of a checkpoint's cost and the mean time between failures. The unit costs
(costs.py) pick the sync strategy's interval with them, the closed form (closed_form.py) and the
report quote them; keeping them here lets costs.py and closed_form.py import one way only.
"""

from __future__ import annotations

import math


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Young (1974): the checkpoint interval that minimises first-order waste, sqrt(2 delta M)."""
    return math.sqrt(2 * checkpoint_s * mtbf_s)


def daly_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly (2006): Young's interval with higher-order terms, for delta < 2M; M beyond that."""
    d, m = checkpoint_s, mtbf_s
    if d >= 2 * m:
        return m
    if d == 0:
        return m  # free checkpoints: any interval works; one MTBF keeps the segment count sane
    x = d / (2 * m)
    return math.sqrt(2 * d * m) * (1 + math.sqrt(x) / 3 + x / 9) - d


def first_order_waste(
    checkpoint_s: float, interval_s: float, mtbf_s: float, restart_s: float
) -> float:
    """Share of time lost: checkpoints (delta/tau) plus, per failure, half an interval and a restart."""
    return checkpoint_s / interval_s + (interval_s / 2 + restart_s) / mtbf_s
