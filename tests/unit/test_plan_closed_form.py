"""Closed-form planner math against cases computed by hand."""

import math

import pytest

from ostinato.plan.closed_form import expected
from ostinato.plan.costs import Costs, FaultKind, IslandCosts
from ostinato.plan.intervals import daly_interval, first_order_waste, young_interval

pytestmark = pytest.mark.timeout(60)


def sync_costs(strategy="sync", islands=1, unit_rate_per_s=1 / 3600, restart_s=60.0,
               step_s=1.0, exchange_s=0.0, inner_steps=1, units_needed=36_000,
               checkpoint_interval_s=600.0, checkpoint_s=10.0) -> Costs:  # fmt: skip
    """Identical islands of one token per step. For sync, the rate and restart are the job's and
    units are steps; otherwise they are one island's and units are island-rounds."""
    island = IslandCosts(
        profile="x", count=islands, chips=8, rate_per_s=unit_rate_per_s / (1 if strategy != "sync" else islands),
        kinds=(FaultKind("crash", 1.0, 0.0),), restart_s=restart_s, step_s=step_s,
        steps=inner_steps, tokens_per_step=1.0, power_w=700.0, price_per_chip_hour=0.0,
    )  # fmt: skip
    per_unit = inner_steps * (islands if strategy == "sync" else 1)
    return Costs(strategy=strategy, groups=(island,), exchange_s=exchange_s,
                 tokens=units_needed * per_unit, job_restart_s=restart_s,
                 checkpoint_interval_s=checkpoint_interval_s, checkpoint_s=checkpoint_s,
                 bytes_per_unit=0.0)  # fmt: skip


def test_young_and_daly_match_the_facts_example():
    # FACTS.md: M = 7.9 h, delta = 6.3 s -> tau ~ 10 min, waste ~ 2.5% with R = 120 s.
    m = 7.9 * 3600
    assert young_interval(6.3, m) == pytest.approx(math.sqrt(2 * 6.3 * m))
    assert young_interval(6.3, m) == pytest.approx(598.6, abs=0.1)
    assert daly_interval(6.3, m) == pytest.approx(594.5, abs=0.5)
    assert first_order_waste(6.3, 598.6, m, 120) == pytest.approx(0.0253, abs=5e-4)


def test_daly_beyond_two_mtbf_is_the_mtbf():
    assert daly_interval(100.0, 40.0) == 40.0


def test_sync_without_failures_is_work_plus_checkpoints():
    c = sync_costs(unit_rate_per_s=1e-15)
    out = expected(c)
    assert out.wall_s == pytest.approx(36_000 + 60 * 10, rel=1e-9)
    assert out.goodput == pytest.approx(36_000 / 36_600, rel=1e-9)
    assert out.interruptions == pytest.approx(0, abs=1e-6)


def test_sync_matches_the_segment_formula_by_hand():
    # 60 segments of 600 s + 10 s; each takes (e^(lam s) - 1)(1/lam + R) in expectation.
    lam, s = 1 / 3600, 610.0
    by_hand = 60 * math.expm1(lam * s) * (3600 + 60)
    out = expected(sync_costs())
    assert out.wall_s == pytest.approx(by_hand, rel=1e-12)
    assert out.interruptions == pytest.approx(60 * math.expm1(lam * s), rel=1e-12)
    assert sum(out.shares.values()) == pytest.approx(1.0, rel=1e-12)


def test_sync_first_order_waste_is_close_to_the_exact_one():
    c = sync_costs(unit_rate_per_s=1 / 86_400, checkpoint_interval_s=1200.0)
    waste = 1 - expected(c).goodput
    assert waste == pytest.approx(first_order_waste(10, 1200, 86_400, 60), rel=0.03)


def test_fleet_island_chain_by_hand():
    # Rounds of 100 s, restart 150 s: a failure at t misses ceil((t + 150) / 100) rounds, i.e.
    # 2 rounds, or 3 when t > 50 s.
    lam, u = 1 / 10_000, 100.0
    c = sync_costs(strategy="fleet", islands=4, unit_rate_per_s=lam,
                   restart_s=150.0, step_s=9.0, exchange_s=10.0, inner_steps=10,
                   units_needed=4000, checkpoint_interval_s=0.0, checkpoint_s=0.0)  # fmt: skip
    q = math.exp(-lam * u)
    late = (math.exp(-lam * 50) - q) / (1 - q)
    attempts = 1 / (q + (1 - q) * (2 + late))
    slots = 4000 / (4 * q * attempts)
    out = expected(c)
    assert out.wall_s == pytest.approx(slots * u, rel=1e-12)
    assert out.shares["exchange"] == pytest.approx(4000 * 10 / (4 * slots * u), rel=1e-12)
    assert sum(out.shares.values()) == pytest.approx(1.0, rel=1e-12)
    assert out.goodput == pytest.approx(4000 * 100 / (4 * slots * u), rel=1e-12)


def test_torchft_voids_every_islands_step_on_a_failure():
    kw = dict(
        islands=10,
        unit_rate_per_s=1 / 600,
        restart_s=5.0,
        step_s=10.0,
        units_needed=100_000,
        checkpoint_interval_s=0.0,
        checkpoint_s=0.0,
    )
    fleet, ft = (
        expected(sync_costs(strategy="fleet", **kw)),
        expected(sync_costs(strategy="torchft", **kw)),
    )
    # A failure costs torchft ~9 more island-steps than a fleet: the other islands' step.
    assert ft.wall_s > fleet.wall_s * 1.1
    assert ft.committed < fleet.committed
