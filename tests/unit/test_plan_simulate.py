"""The Monte Carlo agrees with the closed form where the closed form applies."""

import pytest

from ostinato.plan.closed_form import expected
from ostinato.plan.costs import derive
from ostinato.plan.scenario import build
from ostinato.plan.simulate import best_interval, simulate

pytestmark = pytest.mark.timeout(60)


def scenario(kind: str, islands: int, **reliability):
    return build({
        "model": {"params": 8e9, "tokens": 2e11, "batch_tokens": 4e6},
        "hardware": {"chips": 4096, "islands": islands, "inter_island_gbit_s": 1600},
        "reliability": {"chip_mtbf_hours": 2000, **reliability},
        "strategy": {"kind": kind, "inner_steps": 50},
    })  # fmt: skip


@pytest.mark.parametrize(
    "kind, islands, extra",
    [
        ("sync", 1, {}),
        ("sync", 1, {"hang_mtbf_chip_hours": 4000, "sdc_mtbf_chip_hours": 20000}),
        ("fleet", 16, {}),
        ("fleet", 16, {"hang_mtbf_chip_hours": 4000}),
        ("torchft", 16, {}),
    ],
)
def test_monte_carlo_mean_within_its_confidence_interval(kind, islands, extra):
    costs = derive(scenario(kind, islands, **extra))
    closed = expected(costs)
    sim = simulate(costs, trials=400, seed=1)
    # 3 sigma, plus one round: the Monte Carlo ends on a whole round, the closed form does not.
    tolerance = 1.5 * sim.ci95_wall_s + costs.unit_s
    assert abs(sim.mean_wall_s - closed.wall_s) < tolerance
    assert sim.interruptions.mean() == pytest.approx(closed.interruptions, rel=0.1, abs=1)
    assert sim.goodput == pytest.approx(closed.goodput, abs=0.01)


def test_same_seed_same_answer():
    costs = derive(scenario("fleet", 16))
    a, b = simulate(costs, 50, seed=3), simulate(costs, 50, seed=3)
    assert (a.wall_s == b.wall_s).all()


def test_simulated_optimum_interval_is_near_daly():
    costs = derive(scenario("sync", 1))
    best = best_interval(costs, trials=200, seed=0)
    assert 0.5 <= best / costs.checkpoint_interval_s <= 2.0


def test_fleet_beats_sync_when_chips_fail_often():
    sync = expected(derive(scenario("sync", 1, chip_mtbf_hours=500)))
    fleet = expected(derive(scenario("fleet", 16, chip_mtbf_hours=500)))
    assert fleet.goodput > sync.goodput
