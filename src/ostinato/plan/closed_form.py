"""Expected values in closed form: Young/Daly for checkpoint-restart, a renewal chain for islands.

Both assume exponential failures (memoryless chips) and, as the Monte Carlo does, no new failure
of the unit that is down while it restarts. Under those assumptions the sync formula is exact,
and the island formulas are exact in the long run (they leave out the start and the last round).
Shares are of all chips' time, so a large island weighs more than a small one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ostinato.plan.costs import Costs, IslandCosts
from ostinato.plan.errors import PlanError

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


def expected(costs: Costs) -> Outcome:
    """The closed-form expectation for the scenario's strategy."""
    return _sync(costs) if costs.strategy == "sync" else _islands(costs)


def _sync(c: Costs) -> Outcome:
    """Checkpoint-restart. Work comes in segments of tau seconds then a checkpoint of delta; a
    failure at t into a segment loses t and costs a restart D. With n = e^(lambda s) - 1 expected
    failures per segment of length s, a segment takes n (1/lambda + E[D]) in expectation."""
    lam, tau, delta = c.job_rate_per_s, c.checkpoint_interval_s, c.checkpoint_s
    progress = c.units_needed * c.unit_s
    full = math.floor(progress / tau)
    segments = [(full, tau + delta), (1, progress - full * tau + delta)]
    if progress - full * tau <= 0:
        segments.pop()
    failures = sum(k * _expm1_checked(lam * s, c) for k, s in segments)
    discarded = sum(k * _expm1_checked(lam * s, c) * _lost_before(lam, s) for k, s in segments)
    checkpoints = sum(k for k, _ in segments) * delta
    wall = progress + checkpoints + discarded + failures * (c.job_restart_s + c.job_extra_s)
    seconds = {
        **progress_split(c, progress),
        "checkpoint": checkpoints,
        "discarded": discarded,
        "recovery": failures * c.job_restart_s,
        "detection": failures * c.job_extra_s,
    }
    return Outcome(wall, failures, _shares(seconds, wall))


def progress_split(c: Costs, progress_s: float) -> dict[str, float]:
    """Wall seconds of failure-free progress split into compute, exchange and the time fast
    islands wait for the slowest (sync), each as a share of all chips' time."""
    exchange = progress_s * c.exchange_s / c.unit_s
    compute = progress_s * c.compute_share
    return {"compute": compute, "exchange": exchange, "waiting": progress_s - compute - exchange}


@dataclass
class IslandChain:
    """Expected behaviour of one island kind in the renewal chain, per round slot."""

    group: IslandCosts
    q: float  # P(an island that starts a round live survives it)
    attempts: float  # share of round slots an island starts live
    committed: float  # share of round slots whose round the island commits

    @property
    def failures(self) -> float:
        return self.attempts * (1 - self.q)


def island_chains(c: Costs) -> list[IslandChain]:
    """One chain per island kind. In torchft a failure voids the step of every island, so a
    round counts only when no other island fails in it (islands fail independently)."""
    u = c.unit_s
    chains = []
    for g in c.groups:
        q = math.exp(-g.rate_per_s * u)
        missed = sum(
            k.share * _rounds_missed(g.rate_per_s, u, g.restart_s + k.extra_s) for k in g.kinds
        )
        attempts = 1 / (q + (1 - q) * missed)
        chains.append(IslandChain(g, q, attempts, q * attempts))
    if c.strategy == "torchft":
        alive = [(1 - ch.failures, ch.group.count) for ch in chains]  # P(no failure), islands
        for n, chain in enumerate(chains):
            chain.committed *= math.prod(p ** (k - (m == n)) for m, (p, k) in enumerate(alive))
    return chains


def _islands(c: Costs) -> Outcome:
    """torchft and fleet: each island runs a renewal chain over rounds of length u, the slowest
    island's compute plus the exchange. A live island completes a round with q = e^(-lambda u);
    one that fails at t loses the round, is down D, and rejoins at the next round boundary, m
    rounds later. Rounds train each island's tokens; the run ends when they add up."""
    u = c.unit_s
    chains = island_chains(c)
    per_slot = sum(ch.group.count * ch.committed * ch.group.tokens_per_unit for ch in chains)
    slots = c.tokens / per_slot  # round slots until every token is trained
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    kept = tried = interruptions = 0.0
    for ch in chains:
        g = ch.group
        rounds, failures = g.count * slots * ch.committed, g.count * slots * ch.failures
        voided = g.count * slots * ch.attempts * ch.q - rounds  # survived, another island failed
        seconds["compute"] += g.chips * rounds * g.compute_s
        seconds["exchange"] += g.chips * rounds * c.exchange_s
        lost = failures * _lost_before(g.rate_per_s, u) + voided * u
        seconds["discarded"] += g.chips * lost
        seconds["recovery"] += g.chips * failures * g.restart_s
        seconds["detection"] += g.chips * failures * g.mean_extra_s
        kept, tried = kept + rounds, tried + rounds + voided + failures
        interruptions += failures
    capacity = slots * u * c.chips
    seconds["waiting"] = capacity - sum(seconds.values())
    return Outcome(slots * u, interruptions, _shares(seconds, capacity), kept / tried)


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
            f"the run would never finish: the job fails every {1 / c.job_rate_per_s:.0f} s on "
            f"average, far less than a checkpoint interval plus its save ({x / c.job_rate_per_s:.0f} "
            "s). Raise reliability.chip_mtbf_hours, use fewer chips, or a fault-tolerant strategy."
        )
    return math.expm1(x)


def _shares(seconds: dict[str, float], total: float) -> dict[str, float]:
    return {k: seconds.get(k, 0.0) / total for k in CATEGORIES}
