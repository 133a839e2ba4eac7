"""fleet.warm_start_steps: the fleet's first N rounds are one inner step each, exchanged in fp32
and averaged (outer lr 1, no momentum), so the islands train synchronously before DiLoCo's rounds
begin. Pure arithmetic of the schedule and of one warm round, without processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ostinato.config import ConfigError, FleetConfig, load_config
from ostinato.fleet.compress import message_bytes
from ostinato.fleet.island import FleetIsland, RoundClock, total_inner_steps, total_rounds
from ostinato.fleet.member import FleetMember
from ostinato.fleet.outer import flatten
from ostinato.fleet.streaming import fragment_of
from tests.unit.local_rounds import local_round
from tests.unit.test_fleet_math import U32, tiny_llama
from tests.unit.test_streaming import train_a_little

pytestmark = pytest.mark.timeout(60)


def fleet_cfg(**overrides) -> FleetConfig:
    return FleetConfig(**{"compression": "int4", "block": 64, "island": "a", **overrides})


def test_warm_rounds_come_first_and_the_fragment_schedule_begins_after_them():
    warm, fragments, total = 3, 2, 3 + 6
    plan = [fragment_of(n, fragments, total, warm) for n in range(1, total + 1)]
    # warm rounds carry everything; then fragment 0, 1, 0, 1, 0; the final round everything
    assert plan == [None, None, None, 0, 1, 0, 1, 0, None]
    assert fragment_of(4, 1, 10, 3) == 0 and fragment_of(3, 1, 10, 3) is None


def test_rounds_and_inner_steps_count_the_warm_start():
    cfg = fleet_cfg(budget="steps:10", warm_start_steps=20)
    # 20 warm rounds of one step, then (100 - 20) / 10 = 8 rounds of H = 10
    assert total_rounds(cfg, 100) == 28
    assert total_inner_steps(cfg, 100) == 100
    streaming = fleet_cfg(budget="steps:10", warm_start_steps=20, fragments=2)
    assert total_rounds(streaming, 100) == 20 + 16
    assert total_inner_steps(streaming, 100) == 100
    assert total_rounds(fleet_cfg(budget="steps:10", warm_start_steps=5, rounds=4), 100) == 9


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["fleet.budget=seconds:5", "fleet.rounds=3", "fleet.warm_start_steps=4"], "steps:H"),
        (["train.steps=10", "fleet.warm_start_steps=10"], "must be < train.steps"),
    ],
)
def test_a_warm_start_that_cannot_run_is_refused_by_name(overrides, words):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert "fleet.warm_start_steps" in str(caught.value) and words in str(caught.value)


def test_a_warm_round_is_due_after_one_step_and_the_next_after_h():
    member = FleetMember(fleet_cfg(budget="steps:10", warm_start_steps=3), tiny_llama(0), {})
    assert member.round_due(1, 0.0)
    member.round_have = 3
    assert not member.round_due(1, 0.0) and member.round_due(10, 0.0)


def test_the_schedule_step_counts_one_step_per_warm_round():
    """FleetIsland.schedule_step: where the lr schedule stands after `round_have` rounds."""
    member = SimpleNamespace(budget_kind="steps", budget=10.0, warm_rounds=3, round_have=2)
    island = SimpleNamespace(member=member, clock=RoundClock())
    assert FleetIsland.schedule_step(island, 0) == 2
    member.round_have = 5  # 3 warm rounds + 2 of H = 10
    island.clock.add(4)
    assert FleetIsland.schedule_step(island, 0) == 3 + 20 + 1


def warm_round(members, models, number: int = 1) -> list[str]:
    """A warm round among `members` with their own exchange code, minus the network
    (tests/unit/local_rounds.py), not committed. Each payload is the whole pseudo-gradient in
    fp32 (a warm round's, whatever fleet.compression says). Returns the digests."""
    sizes = []

    def measure(raw, sender, shard):
        sizes.append(raw.numel())
        return raw

    for member in members:
        assert member.warm(number) and member.fragment(number) is None
    results = local_round(members, models, number, (128, 128), tamper=measure, commit=False)
    numel = members[0].outer.numel
    assert set(sizes) == {message_bytes(numel, "fp32", members[0].cfg.block)}
    return [r["digest"] for r in results]


def test_a_warm_round_makes_the_global_parameters_the_islands_mean():
    models = [tiny_llama(0), tiny_llama(0)]
    members = [
        FleetMember(fleet_cfg(island=name, warm_start_steps=2), model, {})
        for name, model in zip("ab", models, strict=True)
    ]
    start = members[0].outer.global_params.clone()
    for seed, model in enumerate(models):
        train_a_little(model, seed)
    a, b = (flatten(m) for m in models)
    digests = warm_round(members, models)
    assert digests[0] == digests[1]
    for member in members:
        got = member.outer.global_params
        # g - fl(0.5 fl(g - a) + 0.5 fl(g - b)): three roundings (the two differences, the sum;
        # halving is exact) and the final subtraction, each within U32 of a value no larger
        # than |g| + |a| + |b|: 4 U32 of that bounds the distance to the exact mean.
        bound = 4 * U32 * (start.abs() + a.abs() + b.abs())
        assert torch.all((got - (a + b) / 2).abs() <= bound)
        # no outer momentum, no error-feedback residual: the warm start leaves DiLoCo's state
        assert not member.outer.optimizer.state and not member.feedback.residual.any()
    members[0].outer.abort()  # a warm round that does not commit leaves nothing behind
    assert torch.equal(members[0].outer.global_params, start)
