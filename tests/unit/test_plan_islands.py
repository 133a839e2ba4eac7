"""Islands of different kinds: the [[islands]] form, its costs and both models, checked by hand."""

import json
import math

import pytest

from ostinato.fleet.compress import message_bytes
from ostinato.plan.chips import load_profile
from ostinato.plan.closed_form import expected
from ostinato.plan.command import plan
from ostinato.plan.costs import Costs, FaultKind, IslandCosts, derive
from ostinato.plan.errors import PlanError
from ostinato.plan.scenario import apply_overrides, build, read_raw
from ostinato.plan.simulate import simulate

pytestmark = pytest.mark.timeout(60)

MIXED = [
    {"profile": "h100", "chips": 8, "count": 2, "mfu": 0.5, "inter_island_gbit_s": 800},
    {"profile": "ascend-910c", "chips": 8, "count": 2, "mfu": 0.5, "inter_island_gbit_s": 400,
     "chip_mtbf_hours": 4000},
]  # fmt: skip


def mixed(kind="fleet", budget="time") -> dict:
    return {
        "model": {"params": 1e9, "tokens": 1e10, "batch_tokens": 1e6},
        "islands": [dict(i) for i in MIXED],
        "reliability": {"island_restart_s": 100},
        "strategy": {"kind": kind, "inner_steps": 10, "budget": budget},
    }


def test_costs_of_mixed_islands_by_hand():
    h100, ascend = load_profile("h100"), load_profile("ascend-910c")
    c = derive(build(mixed()))
    fast, slow = c.groups
    # Every chip takes 1e6 / 32 tokens of a step: 6e9 FLOPs per token over all 32 chips.
    assert fast.step_s == pytest.approx(6e15 / (32 * h100.peak_flops * 0.5))
    assert slow.step_s == pytest.approx(6e15 / (32 * ascend.peak_flops * 0.5))
    # Time budget: the 910C islands' 10 steps; an H100 island fits 10 * 989 / 752 = 13.2.
    assert (fast.steps, slow.steps) == (13, 10)
    assert fast.tokens_per_step == slow.tokens_per_step == 2.5e5
    assert c.units_needed == pytest.approx(1e10 / (2 * 13 * 2.5e5 + 2 * 10 * 2.5e5))
    # Failure rates: 8 chips at the profile's MTBF, or at the kind's own chip_mtbf_hours.
    assert fast.rate_per_s == pytest.approx(8 / h100.mtbf_chip_hours / 3600)
    assert slow.rate_per_s == pytest.approx(8 / 4000 / 3600)
    # An all-gather, as the fleet sends: each island sends its int8 message (1e9 bytes, a 4-byte
    # scale per 128 values, 8 bytes of tokens, a 32-byte MAC) to the 3 others, at the slowest
    # link, 400 Gbit/s = 50 GB/s.
    message = 10**9 + 4 * 10**9 // 128 + 8 + 32
    assert message == message_bytes(10**9, "int8", 128)  # what fleet/member.py sends
    assert c.bytes_per_unit == 3 * message
    assert c.exchange_s == pytest.approx(3 * message / 50e9)
    assert c.unit_s == pytest.approx(10 * slow.step_s + 3 * message / 50e9)
    # A donor copy of 8 bytes per parameter, at the slower of the island's and the donor's link.
    assert fast.restart_s == pytest.approx(100 + 8e9 / 100e9)
    assert slow.restart_s == pytest.approx(100 + 8e9 / 50e9)
    steps = derive(build(mixed(budget="steps")))
    assert [g.steps for g in steps.groups] == [10, 10]


def test_sync_over_mixed_islands_waits_for_the_slowest_step():
    c = derive(build(mixed(kind="sync")))
    fast, slow = c.groups
    assert (fast.steps, slow.steps) == (1, 1)
    assert c.job_rate_per_s == pytest.approx(2 * fast.rate_per_s + 2 * slow.rate_per_s)
    out = expected(c)
    # Per step, 16 H100 wait (slow - fast) while all 32 chips compute 16 fast + 16 slow.
    ratio = (slow.step_s - fast.step_s) / (fast.step_s + slow.step_s)
    assert out.shares["waiting"] / out.shares["compute"] == pytest.approx(ratio)


def two_kinds(strategy: str, fast_steps: int, u_parts=(6.0, 9.0, 10.0), rates=(1e-4, 5e-4),
              restarts=(150.0, 250.0)) -> Costs:  # fmt: skip
    """2 islands of 8 chips (fast) and 3 of 4 chips (slow), one token per step."""
    fast_step, slow_step, exchange = u_parts
    kinds = (FaultKind("crash", 1.0, 0.0),)
    common = dict(kinds=kinds, tokens_per_step=1.0, power_w=1.0, price_per_chip_hour=0.0)
    fast = IslandCosts("a", 2, 8, rates[0], restart_s=restarts[0], step_s=fast_step,
                       steps=fast_steps, **common)  # fmt: skip
    slow = IslandCosts("b", 3, 4, rates[1], restart_s=restarts[1], step_s=slow_step,
                       steps=10 if strategy == "fleet" else 1, **common)  # fmt: skip
    return Costs(strategy, (fast, slow), exchange_s=exchange, tokens=1e6, job_restart_s=0.0,
                 checkpoint_interval_s=0.0, checkpoint_s=0.0, bytes_per_unit=0.0)  # fmt: skip


def chain(lam: float, u: float, down: float) -> tuple[float, float]:
    """(q, attempts) of one island by hand: a failure at t misses ceil((t + down) / u) rounds."""
    q = math.exp(-lam * u)
    whole, rest = divmod(down, u)
    late = (math.exp(-lam * (u - rest)) - q) / (1 - q)
    return q, 1 / (q + (1 - q) * (whole + 1 + late))


@pytest.mark.parametrize("fast_steps", [15, 10])
def test_fleet_of_two_kinds_by_hand(fast_steps):
    # Rounds of 100 s: the slow islands' 10 x 9 s and a 10 s exchange. On a time budget the fast
    # islands fit 15 steps of 6 s; on a step budget they run 10 and wait 30 s.
    out = expected(two_kinds("fleet", fast_steps))
    (qa, aa), (qb, ab) = chain(1e-4, 100, 150), chain(5e-4, 100, 250)
    ca, cb = qa * aa, qb * ab
    slots = 1e6 / (2 * ca * fast_steps + 3 * cb * 10)
    assert out.wall_s == pytest.approx(slots * 100, rel=1e-12)
    assert out.interruptions == pytest.approx(slots * (2 * aa * (1 - qa) + 3 * ab * (1 - qb)))
    # Kept chip-seconds per round: fast 8 chips x (6 s x steps + 10 s), slow 4 chips x 100 s.
    kept = 2 * ca * 8 * (6 * fast_steps + 10) + 3 * cb * 4 * 100
    assert out.goodput == pytest.approx(kept / (28 * 100), rel=1e-12)
    assert out.committed == pytest.approx((2 * ca + 3 * cb) / (2 * aa + 3 * ab), rel=1e-12)
    assert sum(out.shares.values()) == pytest.approx(1.0, rel=1e-12)


def test_torchft_of_two_kinds_by_hand():
    # Steps of 10 s (9 s slow step, 1 s exchange); any failure voids the step for every island.
    c = two_kinds("torchft", 1, u_parts=(6.0, 9.0, 1.0), rates=(1e-3, 2e-3), restarts=(15, 25))
    out = expected(c)
    (qa, aa), (qb, ab) = chain(1e-3, 10, 15), chain(2e-3, 10, 25)
    fa, fb = aa * (1 - qa), ab * (1 - qb)  # P(an island of the kind fails in a slot)
    ca = qa * aa * (1 - fa) * (1 - fb) ** 3
    cb = qb * ab * (1 - fa) ** 2 * (1 - fb) ** 2
    slots = 1e6 / (2 * ca + 3 * cb)
    assert out.wall_s == pytest.approx(slots * 10, rel=1e-12)
    assert out.goodput == pytest.approx((2 * ca * 8 * 7 + 3 * cb * 4 * 10) / 280, rel=1e-12)


@pytest.mark.parametrize("kind", ["sync", "torchft", "fleet"])
def test_one_kind_split_in_two_changes_nothing(kind):
    uniform = {"hardware": {"chips": 2048, "islands": 4}, "strategy": {"kind": kind}}
    listed = {
        "islands": [{"profile": "h100", "chips": 512, "count": 4}],
        "strategy": {"kind": kind},
    }
    halves = {"islands": [{"profile": "h100", "chips": 512, "count": 2}] * 2,
              "strategy": {"kind": kind}}  # fmt: skip
    a, b, c = (expected(derive(build(raw))) for raw in (uniform, listed, halves))
    assert a.wall_s == pytest.approx(b.wall_s, rel=1e-12) == pytest.approx(c.wall_s, rel=1e-12)
    assert a.goodput == pytest.approx(c.goodput, rel=1e-12)


def simulated_scenario(kind: str, budget: str):
    return build({
        "model": {"params": 8e9, "tokens": 2e12, "batch_tokens": 4e6},
        "islands": [
            {"profile": "h100", "chips": 256, "count": 6, "inter_island_gbit_s": 1600},
            {"profile": "ascend-910c", "chips": 256, "count": 10, "inter_island_gbit_s": 800,
             "chip_mtbf_hours": 1000},
        ],
        "reliability": {"chip_mtbf_hours": 2000, "hang_mtbf_chip_hours": 8000},
        "strategy": {"kind": kind, "inner_steps": 50, "budget": budget},
    })  # fmt: skip


@pytest.mark.parametrize(
    "kind, budget", [("fleet", "time"), ("fleet", "steps"), ("torchft", "steps"), ("sync", "steps")]
)
def test_monte_carlo_of_mixed_islands_within_the_closed_forms_interval(kind, budget):
    costs = derive(simulated_scenario(kind, budget))
    closed = expected(costs)
    sim = simulate(costs, trials=400, seed=2)
    # 3 sigma, plus one round: the Monte Carlo ends on a whole round, the closed form does not.
    assert abs(sim.mean_wall_s - closed.wall_s) < 1.5 * sim.ci95_wall_s + costs.unit_s
    assert sim.interruptions.mean() == pytest.approx(closed.interruptions, rel=0.1, abs=1)
    assert sim.goodput == pytest.approx(closed.goodput, abs=0.01)
    by_kind = sim.group_interruptions
    assert sum(by_kind) == pytest.approx(sim.interruptions.mean())
    assert by_kind[1] > by_kind[0]  # more islands, and twice the failure rate per chip


def test_time_budget_beats_step_budget():
    steps, time = (expected(derive(simulated_scenario("fleet", b))) for b in ("steps", "time"))
    assert time.wall_s < steps.wall_s
    assert time.shares["waiting"] < steps.shares["waiting"]


@pytest.mark.parametrize(
    "islands, hardware, match",
    [
        ([{"profile": "tpu-v9", "chips": 8}], {}, r"islands\[0\].profile = 'tpu-v9'.*allowed: a100"),
        ([{"profile": "h100", "chips": 0}], {}, r"islands\[0\].chips = 0: must be > 0"),
        ([{"profile": "h100", "chips": 8, "count": -1}], {}, r"islands\[0\].count = -1"),
        ([{"profile": "h100", "chips": 8}], {"chips": 64, "profile": "a100"},
         r"hardware.profile, hardware.chips: not allowed beside \[\[islands\]\]"),
        ([], {}, r"one or more \[\[islands\]\] tables"),
        ({"profile": "h100"}, {}, r"one or more \[\[islands\]\] tables"),
        ([{"chips": 8}], {}, r"islands\[0\]: missing profile"),
        ([{"profile": "h100", "chips": 8, "gpus": 3}], {}, r"islands\[0\].gpus: unknown key; allowed: profile, chips, count"),
        ([{"profile": "h100", "chips": 8}], {}, r"needs the sum of islands\[N\].count >= 2"),
    ],
)  # fmt: skip
def test_bad_islands_are_refused_naming_the_field(islands, hardware, match):
    raw = {"islands": islands, "hardware": hardware, "strategy": {"kind": "fleet"}}
    with pytest.raises(PlanError, match=match):
        build(raw)


def test_island_too_small_for_the_model_names_its_field():
    raw = mixed()
    raw["islands"][1]["chips"] = 1
    raw["model"]["params"] = 10e9
    with pytest.raises(PlanError, match=r"island of 1 .*islands\[1\].chips"):
        derive(build(raw))


def test_island_overrides_and_a_preset_replaced_by_a_file(tmp_path):
    raw = apply_overrides(mixed(), ["islands.1.count=5", 'islands.0.profile="h800"'])
    s = build(raw)
    assert [(i.profile, i.count) for i in s.islands] == [("h800", 2), ("ascend-910c", 5)]
    with pytest.raises(PlanError, match="islands.N.key=value with N from 0 to 1"):
        apply_overrides(mixed(), ["islands.2.count=1"])
    path = tmp_path / "mine.toml"
    path.write_text('[[islands]]\nprofile = "h100"\nchips = 8192\ncount = 2\n')
    s = build(read_raw(str(path), "llama3-405b"))  # the preset's identical islands give way
    assert [(i.profile, i.chips, i.count) for i in s.islands] == [("h100", 8192, 2)]
    assert s.model.params == 405e9
    path.write_text('[hardware]\nprofile = "a100"\nchips = 512\nislands = 4\n')
    s = build(read_raw(str(path), "mixed-h100-910c"))  # and the other way round
    assert [(i.profile, i.chips, i.count) for i in s.islands] == [("a100", 128, 4)]
    with pytest.raises(PlanError, match="no \\[\\[islands\\]\\] tables"):
        apply_overrides({}, ["islands.0.count=2"])


def test_inherited_figures_fill_what_a_kind_leaves_out():
    s = build({
        "islands": [{"profile": "h100", "chips": 8, "count": 2, "price_per_chip_hour": 3.0},
                    {"profile": "a100", "chips": 8}],
        "hardware": {"inter_island_gbit_s": 25},
        "reliability": {"chip_mtbf_hours": 777},
        "run": {"price_per_chip_hour": 1.0},
    })  # fmt: skip
    assert [i.inter_island_gbit_s for i in s.islands] == [25, 25]
    assert [i.chip_mtbf_hours for i in s.islands] == [777, 777]
    assert [i.price_per_chip_hour for i in s.islands] == [3.0, 1.0]
    assert s.islands[1].count == 1


def test_command_reports_each_kind(capsys):
    assert plan(preset="mixed-h100-910c", json_out=True, price_per_chip_hour=1.0) == 0
    r = json.loads(capsys.readouterr().out)
    kinds = r["island_kinds"]
    assert [(k["profile"], k["count"]) for k in kinds] == [("h100", 2), ("ascend-910c", 3)]
    assert kinds[0]["inner_steps"] > kinds[1]["inner_steps"] == 100  # time budget
    assert r["energy_mwh"] == pytest.approx(sum(k["energy_mwh"] for k in kinds))
    assert r["cost"] == pytest.approx(sum(k["cost"] for k in kinds))
    assert sum(k["interruptions"] for k in kinds) == pytest.approx(r["interruptions"])
    assert r["chips"] == 5120 and r["islands"] == 5 and r["budget"] == "time"
    assert plan(preset="mixed-h100-910c", sweep=["strategy.budget=steps,time"]) == 0
    assert "islands by kind" not in capsys.readouterr().out  # a sweep prints one table
    assert plan(preset="mixed-h100-910c") == 0
    assert "3 x 1024 ascend-910c" in capsys.readouterr().out


def test_first_override_without_a_scenario_file_is_an_override(capsys):
    # The CLI hands `ostinato plan --preset P --hardware.chips=N` its override as the scenario.
    assert plan("--hardware.chips=8192", preset="llama3-405b", json_out=True) == 0
    assert json.loads(capsys.readouterr().out)["chips"] == 8192
