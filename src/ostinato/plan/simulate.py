"""Discrete-event Monte Carlo: failures drawn at random, losses counted per strategy.

Trials run side by side as numpy arrays; the Python loops step from one failure to the next, so the
cost grows with the number of failures, not with the number of steps. Each failing unit (the job
for sync, an island otherwise) fails at the sum of its chips' rates: the first of many exponential
clocks is itself exponential, so drawing per unit is the same as drawing per chip. Islands of
different kinds are drawn with their own rates and restarts, and count by their tokens and chips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ostinato.plan.closed_form import CATEGORIES, WORK, expected, progress_split
from ostinato.plan.costs import Costs, FaultKind

# Cap on trials x islands x failure cycles held at once, so a 10,000-island fleet stays in memory.
MAX_CELLS = 20_000_000
# Columns of an island's weights: what one committed round of it adds up to.
TOKENS, ROUNDS, CHIPS, COMPUTE = range(4)


@dataclass
class Simulation:
    wall_s: np.ndarray  # time to train, per trial
    interruptions: np.ndarray  # failures, per trial
    shares: dict[str, float]  # CATEGORIES -> share of all chips' time, from the trial means
    committed: float | None = None  # share of island-rounds tried that were committed (islands)
    group_interruptions: tuple[float, ...] = ()  # mean failures of each island kind

    @property
    def mean_wall_s(self) -> float:
        return float(self.wall_s.mean())

    @property
    def goodput(self) -> float:
        return sum(self.shares[k] for k in WORK)

    @property
    def ci95_wall_s(self) -> float:
        """Half width of the 95% confidence interval of the mean time to train."""
        return 1.96 * float(self.wall_s.std(ddof=1)) / math.sqrt(len(self.wall_s))

    def p_within(self, deadline_s: float) -> float:
        return float((self.wall_s <= deadline_s).mean())


def simulate(costs: Costs, trials: int, seed: int) -> Simulation:
    rng = np.random.default_rng(seed)
    if costs.strategy == "sync":
        return _sync(costs, rng, trials)
    return _islands(costs, rng, trials)


def best_interval(costs: Costs, trials: int, seed: int) -> float:
    """The simulated optimum checkpoint interval (sync): the best of a grid around Daly's."""
    from dataclasses import replace

    grid = [costs.checkpoint_interval_s * f for f in (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8)]
    walls = [
        simulate(replace(costs, checkpoint_interval_s=t), trials, seed).mean_wall_s for t in grid
    ]
    return grid[int(np.argmin(walls))]


def _draw_extra(kinds: tuple[FaultKind, ...], rng: np.random.Generator, size) -> np.ndarray:
    """Extra downtime of each failure, by drawing its kind (crash, hang, corruption)."""
    shares = np.array([k.share for k in kinds])
    extras = np.array([k.extra_s for k in kinds])
    return extras[rng.choice(len(extras), size=size, p=shares / shares.sum())]


def _sync(c: Costs, rng: np.random.Generator, trials: int) -> Simulation:
    """Checkpoint-restart: from the last checkpoint, run segments until the next failure."""
    tau, delta = c.checkpoint_interval_s, c.checkpoint_s
    progress = c.units_needed * c.unit_s
    full = math.floor(progress / tau)
    last = progress - full * tau
    tail = last + delta if last > 0 else 0.0
    segment = tau + delta
    done = np.zeros(trials, dtype=np.int64)  # full segments safely checkpointed
    wall, failures, lost, extra = (np.zeros(trials) for _ in range(4))
    active = np.arange(trials)
    while active.size:
        left = full - done[active]
        clean = left * segment + tail  # time to the end if nothing fails
        t = rng.exponential(1 / c.job_rate_per_s, active.size)
        ok = t >= clean
        wall[active[ok]] += clean[ok]
        idx, t = active[~ok], t[~ok]
        kept = np.minimum(np.floor(t / segment), left[~ok]).astype(np.int64)
        ext = _draw_extra(c.job_kinds, rng, idx.size)
        done[idx] += kept
        wall[idx] += t + c.job_restart_s + ext
        lost[idx] += t - kept * segment
        extra[idx] += ext
        failures[idx] += 1
        active = idx
    seconds = {
        **progress_split(c, progress),
        "checkpoint": (full + (last > 0)) * delta,
        "discarded": lost.mean(),
        "recovery": failures.mean() * c.job_restart_s,
        "detection": extra.mean(),
    }
    # Which island kind failed does not change a sync run; its expected share is reported.
    mean = float(failures.mean())
    by_kind = tuple(mean * g.count * g.rate_per_s / c.job_rate_per_s for g in c.groups)
    return Simulation(wall, failures, _shares(seconds, wall.mean()), None, by_kind)


@dataclass
class _Islands:
    """The islands one by one: failure rate, restart, kind, and the weights of a committed round
    (tokens, 1 round, chips, compute chip-seconds), one row per island."""

    rate: np.ndarray
    restart: np.ndarray
    kind: np.ndarray  # index of the island's kind in Costs.groups
    weights: np.ndarray  # (islands, 4)

    @classmethod
    def of(cls, c: Costs) -> _Islands:
        rows = [(n, g) for n, g in enumerate(c.groups) for _ in range(g.count)]
        return cls(
            rate=np.array([g.rate_per_s for _, g in rows]),
            restart=np.array([g.restart_s for _, g in rows]),
            kind=np.array([n for n, _ in rows]),
            weights=np.array(
                [(g.tokens_per_unit, 1, g.chips, g.chips * g.compute_s) for _, g in rows]
            ),
        )


@dataclass
class _Cycles:
    """Per trial and island, one row per failure: live from `start` for `live` rounds, then it
    fails at `lost` seconds into a round and is back `missed` round slots later."""

    start: np.ndarray  # (trials, islands, cycles) round index
    live: np.ndarray
    lost: np.ndarray  # seconds of work thrown away by the failure
    extra: np.ndarray  # detection seconds on top of the restart

    @property
    def fail_round(self) -> np.ndarray:
        return self.start + self.live


def _draw_cycles(
    c: Costs, isl: _Islands, rng: np.random.Generator, trials: int, horizon: int
) -> _Cycles:
    """Failure cycles of every island until each has passed `horizon` round slots."""
    u = c.unit_s
    pos = np.zeros((trials, len(isl.rate)), dtype=np.int64)
    rows: list[tuple[np.ndarray, ...]] = []
    while pos.min() < horizon:
        t = rng.exponential(1 / isl.rate, pos.shape)
        live = np.floor(t / u).astype(np.int64)
        lost = t - live * u
        ext = np.zeros(pos.shape)
        for n, g in enumerate(c.groups):
            ext[:, isl.kind == n] = _draw_extra(g.kinds, rng, (trials, g.count))
        missed = np.ceil((lost + isl.restart + ext) / u).astype(np.int64)
        rows.append((pos, live, lost, ext))
        pos = pos + live + np.maximum(missed, 1)
    start, live, lost, ext = (np.stack(col, axis=-1) for col in zip(*rows, strict=True))
    return _Cycles(start, live, lost, ext)


def _islands(c: Costs, rng: np.random.Generator, trials: int) -> Simulation:
    """torchft and fleet on a grid of round slots: find the first slot by which the committed
    rounds have trained every token, per trial, by bisection."""
    isl = _Islands.of(c)
    guess = expected(c).wall_s / c.unit_s
    cycles_each = 2 + guess * c.unit_s * isl.rate.max() * 1.5
    weights = isl.weights.shape[1] if c.strategy == "torchft" else 1  # the voids index holds them
    trials = max(20, min(trials, int(MAX_CELLS / (c.islands * cycles_each * weights))))
    horizon = int(guess * 1.3) + 10
    needed = c.tokens * (1 - 1e-12)  # sums of float tokens may miss the total by a rounding
    while True:
        cyc = _draw_cycles(c, isl, rng, trials, horizon)
        count = _Committed(c, isl, cyc)
        if (count(np.full(trials, horizon))[:, TOKENS] >= needed).all():
            break
        horizon *= 2
    lo, hi = np.zeros(trials, dtype=np.int64), np.full(trials, horizon, dtype=np.int64)
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        ok = count(mid)[:, TOKENS] >= needed
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return _island_outcome(c, isl, cyc, count, hi)


class _Committed:
    """Weights (tokens, rounds, chips, compute) of the rounds committed before a slot K, per
    trial. In torchft a round in which any island fails is voided for all of them, so the live
    islands of each such round are taken off."""

    def __init__(self, c: Costs, isl: _Islands, cyc: _Cycles) -> None:
        self.cyc, self.weights = cyc, isl.weights
        self.voids = c.strategy == "torchft"
        if self.voids:
            self._index_voids(cyc)

    def __call__(self, k: np.ndarray) -> np.ndarray:
        cyc, kk = self.cyc, k[:, None, None]
        live = np.clip(kk - cyc.start, 0, cyc.live).sum(axis=2) @ self.weights
        return live - self.voided(k) if self.voids else live

    def voided(self, k: np.ndarray) -> np.ndarray:
        if not self.voids:
            return np.zeros((len(k), self.weights.shape[1]))
        base = np.arange(len(k)) * self.span
        hi = np.searchsorted(self.fail_keys, base + k, side="left")
        lo = np.searchsorted(self.fail_keys, base, side="left")
        return self.cum_voided[hi] - self.cum_voided[lo]

    def _index_voids(self, cyc: _Cycles) -> None:
        """Sort every island's live spans as +w/-w events keyed by (trial, round), so that the
        weights of the live islands in any round are a cumulative sum read by binary search."""
        trials = cyc.start.shape[0]
        self.span = int(cyc.fail_round.max()) + 2
        base = (np.arange(trials) * self.span)[:, None, None]
        keys = np.concatenate([(base + cyc.start).ravel(), (base + cyc.fail_round).ravel()])
        w = np.broadcast_to(self.weights[None, :, None, :], (*cyc.start.shape, 4)).reshape(-1, 4)
        order = np.argsort(keys, kind="stable")
        keys, live = keys[order], np.cumsum(np.concatenate([w, -w])[order], axis=0)
        self.fail_keys = np.unique((base + cyc.fail_round).ravel())
        at = np.searchsorted(keys, self.fail_keys, side="right") - 1
        self.cum_voided = np.concatenate([np.zeros((1, 4)), np.cumsum(live[at], axis=0)])


def _island_outcome(
    c: Costs, isl: _Islands, cyc: _Cycles, count: _Committed, slots: np.ndarray
) -> Simulation:
    u, chips = c.unit_s, isl.weights[:, CHIPS]
    before = cyc.fail_round < slots[:, None, None]
    fails = before.sum(axis=2).astype(float)  # (trials, islands)
    wall = slots * u
    voided, kept = count.voided(slots), count(slots)
    # The last round may overshoot the tokens needed: count the work needed, not the overshoot.
    need = (kept * (c.tokens / kept[:, TOKENS])[:, None]).mean(axis=0)
    seconds = {
        "compute": need[COMPUTE],
        "exchange": need[CHIPS] * c.exchange_s,
        "discarded": ((cyc.lost * before).sum(axis=2) @ chips + voided[:, CHIPS] * u).mean(),
        "recovery": (fails @ (isl.restart * chips)).mean(),
        "detection": ((cyc.extra * before).sum(axis=2) @ chips).mean(),
    }
    capacity = wall.mean() * c.chips
    seconds["waiting"] = capacity - sum(seconds.values())
    failures = fails.sum(axis=1)
    committed = need[ROUNDS] / (need[ROUNDS] + voided[:, ROUNDS].mean() + failures.mean())
    by_kind = tuple(float(fails[:, isl.kind == n].sum(axis=1).mean()) for n in range(len(c.groups)))
    return Simulation(wall, failures, _shares(seconds, capacity), float(committed), by_kind)


def _shares(seconds: dict[str, float], total: float) -> dict[str, float]:
    return {k: float(seconds.get(k, 0.0)) / total for k in CATEGORIES}
