"""Expected values in closed form: Young/Daly for checkpoint-restart, a renewal chain for islands.

Both assume exponential failures (memoryless chips) and, as the Monte Carlo does, no new failure
of the unit that is down while it restarts. Under those assumptions the sync formula is exact,
and the island formulas are exact in the long run (they leave out the start and the last round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ostinato.plan.errors import PlanError

if TYPE_CHECKING:
    from ostinato.plan.costs import Costs

# Where the wall-clock time of all chips goes. Work that was kept is compute plus the exposed
# communication of kept steps (DESIGN.md counts a step's own communication as work); the rest are
# losses, and goodput is the kept share.
WORK = ("compute", "exchange")
LOSSES = ("checkpoint", "discarded", "recovery", "detection", "waiting")
CATEGORIES = WORK + LOSSES
# Beyond e^30 expected attempts per checkpoint segment a run never finishes in practice.
MAX_EXPONENT = 30.0


@dataclass
class Outcome:
    wall_s: float  # time to train
    interruptions: float  # failures over the run
    shares: dict[str, float]  # CATEGORIES -> share of all chips' wall-clock time; sums to 1
    committed: float | None = None  # share of island-rounds tried that were committed (islands)

    @property
    def goodput(self) -> float:
        return self.shares["compute"] + self.shares["exchange"]


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


def expected(costs: Costs) -> Outcome:
    """The closed-form expectation for the scenario's strategy."""
    return _sync(costs) if costs.strategy == "sync" else _islands(costs)


def _sync(c: Costs) -> Outcome:
    """Checkpoint-restart. Work comes in segments of tau seconds then a checkpoint of delta; a
    failure at t into a segment loses t and costs a restart D. With n = e^(lambda s) - 1 expected
    failures per segment of length s, a segment takes n (1/lambda + E[D]) in expectation."""
    lam, tau, delta = c.unit_rate_per_s, c.checkpoint_interval_s, c.checkpoint_s
    progress = c.units_needed * c.unit_s
    full = math.floor(progress / tau)
    segments = [(full, tau + delta), (1, progress - full * tau + delta)]
    if progress - full * tau <= 0:
        segments.pop()
    failures = sum(k * _expm1_checked(lam * s, c) for k, s in segments)
    discarded = sum(k * _expm1_checked(lam * s, c) * _lost_before(lam, s) for k, s in segments)
    checkpoints = sum(k for k, _ in segments) * delta
    wall = progress + checkpoints + discarded + failures * (c.restart_s + c.mean_extra_s)
    seconds = {
        "compute": progress * c.compute_share,
        "exchange": progress * (1 - c.compute_share),
        "checkpoint": checkpoints,
        "discarded": discarded,
        "recovery": failures * c.restart_s,
        "detection": failures * c.mean_extra_s,
    }
    return Outcome(wall, failures, _shares(seconds, wall))


def _islands(c: Costs) -> Outcome:
    """torchft and fleet: each island runs a renewal chain over rounds of length u. A live island
    completes a round with q = e^(-lambda u); one that fails at t loses the round, is down D, and
    rejoins at the next round boundary, m rounds later. In torchft a failure also voids the step
    of every other island, because the step is committed by all or by none."""
    lam, u, n = c.unit_rate_per_s, c.unit_s, c.islands
    q = math.exp(-lam * u)
    rounds_per_failure = sum(
        k.share * _rounds_missed(lam, u, c.restart_s + k.extra_s) for k in c.kinds
    )
    attempts = 1 / (q + (1 - q) * rounds_per_failure)  # share of round slots an island starts live
    committed = q * attempts
    if c.strategy == "torchft":
        committed *= (1 - attempts * (1 - q)) ** (n - 1)
    slots = c.units_needed / (n * committed)  # round slots until every token is trained
    failures = n * slots * attempts * (1 - q)
    voided = n * slots * attempts * q - c.units_needed  # survived, but another island failed
    seconds = {
        "compute": c.units_needed * c.inner_steps * c.step_s,
        "exchange": c.units_needed * c.exchange_s,
        "discarded": failures * _lost_before(lam, u) + voided * u,
        "recovery": failures * c.restart_s,
        "detection": failures * c.mean_extra_s,
    }
    seconds["waiting"] = n * slots * u - sum(seconds.values())
    tried = c.units_needed + voided + failures
    return Outcome(slots * u, failures, _shares(seconds, slots * u * n), c.units_needed / tried)


def _rounds_missed(lam: float, u: float, down_s: float) -> float:
    """Expected round slots an island misses when it fails: ceil((t + D) / u), t the failure time
    within the round, exponential and conditioned on t < u."""
    whole, rest = divmod(down_s, u)
    # P(t > u - rest | t < u): the failure comes late enough to push the return one round further.
    late = math.exp(-lam * (u - rest)) * -math.expm1(-lam * rest) / -math.expm1(-lam * u)
    return whole + 1 + late


def _lost_before(lam: float, s: float) -> float:
    """E[t | t < s] for an exponential failure time t: the work a failure throws away."""
    x = lam * s
    if x < 1e-4:
        return s * (0.5 - x / 12)  # the series: the exact form cancels catastrophically here
    return 1 / lam - s / math.expm1(x)


def _expm1_checked(x: float, c: Costs) -> float:
    if x > MAX_EXPONENT:
        raise PlanError(
            f"the run would never finish: the job fails every {1 / c.unit_rate_per_s:.0f} s on "
            f"average, far less than a checkpoint interval plus its save ({x / c.unit_rate_per_s:.0f} "
            "s). Raise reliability.chip_mtbf_hours, use fewer chips, or a fault-tolerant strategy."
        )
    return math.expm1(x)


def _shares(seconds: dict[str, float], total: float) -> dict[str, float]:
    return {k: seconds.get(k, 0.0) / total for k in CATEGORIES}
