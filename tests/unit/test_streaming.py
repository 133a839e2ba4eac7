"""Streaming DiLoCo without processes: fragments, their schedule, fragment rounds, the merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ostinato.config import ConfigError, FleetConfig, load_config
from ostinato.fleet.compress import ErrorFeedback, pack, payload_size, unpack
from ostinato.fleet.member import FleetMember
from ostinato.fleet.outer import OuterState, digest, flatten, unique_parameters
from ostinato.fleet.shards import ShardSet
from ostinato.fleet.streaming import fragment_cuts, fragment_of, send_in_background
from tests.unit.local_rounds import local_round
from tests.unit.test_fleet_math import U32, tiny_llama

pytestmark = pytest.mark.timeout(60)


def fleet_cfg(**overrides) -> FleetConfig:
    return FleetConfig(**{"compression": "int8", "block": 64, "island": "a", **overrides})


def train_a_little(model: nn.Module, seed: int) -> None:
    """Stand-in for inner steps: move every parameter by a small random amount."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 1e-2)


def fleet_round(members, models, number: int, tokens=(100, 300)) -> list[str]:
    """Round `number` among `members` with the members' own exchange code, minus the network
    (tests/unit/local_rounds.py). Returns the digests."""
    return [r["digest"] for r in local_round(members, models, number, tokens)]


# --- fragments and their schedule ---------------------------------------------------------------


def tiny_sizes() -> list[int]:
    return [p.numel() for p in unique_parameters(tiny_llama(0))]


@pytest.mark.parametrize("fragments", [1, 2, 3, 4])
def test_fragments_are_contiguous_groups_of_whole_tensors_of_about_equal_size(fragments):
    sizes = tiny_sizes()
    cuts = fragment_cuts(sizes, fragments)
    assert cuts[0] == 0 and cuts[-1] == len(sizes) and len(cuts) == fragments + 1
    assert all(a < b for a, b in zip(cuts, cuts[1:], strict=False))  # none empty, in order
    per_fragment = [sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert sum(per_fragment) == sum(sizes)
    # so each exchange carries ~1/P of the parameters: the peak bandwidth drops P-fold
    assert max(per_fragment) <= 1.25 * sum(sizes) / fragments


def test_more_fragments_than_parameter_tensors_are_refused_by_name():
    with pytest.raises(ValueError, match=r"fleet.fragments = 22: .* 21 parameter tensors"):
        fragment_cuts(tiny_sizes(), 22)
    with pytest.raises(ValueError, match="fleet.fragments"):
        OuterState(tiny_llama(0), fleet_cfg(fragments=22))


@pytest.mark.parametrize("fragments", [2, 3, 4])
def test_every_parameter_is_synchronised_exactly_once_every_h_steps(fragments):
    """Round r comes after r*H/P inner steps and steps only its fragment's slice of the global
    parameters and momentum; each element is stepped every H steps, offset (p+1)*H/P."""
    h, cycles = 12, 4
    model = tiny_llama(0)
    outer = OuterState(model, fleet_cfg(fragments=fragments, outer_momentum=0.9))
    total = fragments * cycles
    last = torch.full((outer.numel,), -1)  # the inner step of each element's latest sync
    count = torch.zeros(outer.numel, dtype=torch.long)
    for number in range(1, total):  # the final round, which syncs everything, comes below
        step, fragment = number * h // fragments, fragment_of(number, fragments, total)
        before, momentum = outer.global_params.clone(), outer._momentum()
        outer.tentative_step(torch.ones(outer.size(fragment)), fragment)
        outer.commit()
        lo, hi = outer.span(fragment)
        changed = outer.global_params != before
        assert changed[lo:hi].all() and not changed[:lo].any() and not changed[hi:].any()
        if momentum is not None:  # the other fragments' momentum is left alone too
            now = outer._momentum()
            assert torch.equal(now[:lo], momentum[:lo]) and torch.equal(now[hi:], momentum[hi:])
        first = last[lo:hi] == -1
        assert (step - last[lo:hi])[~first].eq(h).all()  # once every H steps
        assert not first.any() or (first.all() and step == (fragment + 1) * h // fragments)
        last[lo:hi], count[lo:hi] = step, count[lo:hi] + 1
    expected = torch.full_like(count, cycles)
    expected[outer.bounds[-1][0] :] = cycles - 1  # its last sync is the final round's
    assert torch.equal(count, expected)
    assert fragment_of(total, fragments, total) is None  # the final round: every fragment
    assert [fragment_of(r, 1, total) for r in range(1, total + 1)] == [0] * total


def test_bytes_per_exchange_shrink_with_the_fragments():
    model = tiny_llama(0)
    whole = payload_size(flatten(model).numel(), "int4", 128)
    for fragments in (2, 4):
        outer = OuterState(model, fleet_cfg(fragments=fragments))
        sizes = [payload_size(outer.size(f), "int4", 128) for f in range(fragments)]
        assert max(sizes) <= 1.25 * whole / fragments
        # each parameter once per H steps: the fragments' blocks are the whole's, plus at most
        # one partial block per cut (64 bytes of 4-bit values and a 4-byte scale)
        assert whole <= sum(sizes) <= whole + (fragments - 1) * (128 // 2 + 4)


# --- one fragment is plain DiLoCo ---------------------------------------------------------------


def test_one_fragment_is_plain_diloco_bit_for_bit():
    """The member's rounds with fragments = 1 against DiLoCo written out: a flat Parameter, torch's
    Nesterov SGD over the token-weighted mean of the int8 pseudo-gradients with error feedback."""
    start = tiny_llama(0)
    models = [copy.deepcopy(start), copy.deepcopy(start)]
    members = [
        FleetMember(fleet_cfg(island=name, outer_lr=0.7, outer_momentum=0.9), model, {})
        for name, model in zip("ab", models, strict=True)
    ]
    reference = nn.Parameter(flatten(start))
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    feedback = [ErrorFeedback(reference.numel(), "int8", 64) for _ in models]
    plain = [copy.deepcopy(start), copy.deepcopy(start)]
    for number in range(1, 5):
        for i, (model, other) in enumerate(zip(models, plain, strict=True)):
            train_a_little(model, seed=10 * number + i)
            train_a_little(other, seed=10 * number + i)
        digests = fleet_round(members, models, number)
        values = [
            unpack(ef.compress(reference.detach() - flatten(m)), 64)
            for ef, m in zip(feedback, plain, strict=True)
        ]
        averaged = torch.zeros(reference.numel())
        for value, weight in zip(values, (100 / 400, 300 / 400), strict=True):
            averaged += weight * value
        reference.grad = averaged
        sgd.step()
        for ef in feedback:
            ef.commit()
        for m in plain:
            offset = 0
            with torch.no_grad():
                for p in unique_parameters(m):
                    p.copy_(reference[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
        assert digests == [digest(reference.detach())] * 2
        for member, model in zip(members, models, strict=True):
            assert torch.equal(member.outer.global_params, reference.detach())
            assert torch.equal(member.outer._momentum(), sgd.state[reference]["momentum_buffer"])
            assert torch.equal(flatten(model), reference.detach())


# --- fragment rounds -------------------------------------------------------------------------


def test_members_end_a_fragment_round_bit_identical():
    start = tiny_llama(0)
    models = [copy.deepcopy(start), copy.deepcopy(start)]
    rounds = {"rounds": 4}  # the fingerprint says how many: the last round syncs everything
    members = [
        FleetMember(fleet_cfg(island=name, fragments=2), model, rounds)
        for name, model in zip("ab", models, strict=True)
    ]
    for number in range(1, 5):
        for i, model in enumerate(models):
            train_a_little(model, seed=10 * number + i)
        locals_before = [flatten(m) for m in models]
        fragment = members[0].fragment(number)
        digests = fleet_round(members, models, number)
        assert digests[0] == digests[1]
        assert torch.equal(members[0].outer.as_tensor(), members[1].outer.as_tensor())
        lo, hi = members[0].outer.span(fragment)
        for model, before in zip(models, locals_before, strict=True):
            now = flatten(model)
            assert torch.equal(now[lo:hi], members[0].outer.global_params[lo:hi])
            # the other fragment keeps its local progress until its own round
            assert torch.equal(now[:lo], before[:lo]) and torch.equal(now[hi:], before[hi:])
        if number < 4:
            assert fragment == (number - 1) % 2 and hi - lo < members[0].outer.numel
    assert fragment is None  # the final round synchronised everything: the islands agree
    assert torch.equal(flatten(models[0]), flatten(models[1]))


def test_a_fragment_pseudo_gradient_is_sent_with_its_own_error_feedback():
    ef = ErrorFeedback(10, "int8", 2)
    g = torch.linspace(-1, 1, 4) / 3
    sent = ef.compress(g, start=4)
    ef.commit()
    error = g - unpack(pack(g, "int8", 2), 2)
    assert torch.equal(unpack(sent, 2), unpack(pack(g, "int8", 2), 2))
    assert torch.equal(ef.residual[4:8], error)
    assert torch.equal(ef.residual[:4], torch.zeros(4)) and torch.equal(
        ef.residual[8:], torch.zeros(2)
    )
    ef.carry(torch.ones(2), start=8)
    assert torch.equal(ef.residual[8:], torch.ones(2))


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "with-momentum"])
def test_a_fragment_step_then_abort_restores_everything(warm):
    outer = OuterState(tiny_llama(0), fleet_cfg(fragments=3, outer_momentum=0.9))
    gen = torch.Generator().manual_seed(4)
    if warm:
        outer.tentative_step(torch.randn(outer.numel, generator=gen), None)
        outer.commit()
    state = outer.as_tensor()
    momentum = outer._momentum()
    first = outer.tentative_step(torch.randn(outer.size(1), generator=gen), 1)
    assert not torch.equal(outer.as_tensor(), state)
    outer.abort()
    assert torch.equal(outer.as_tensor(), state)
    assert (outer._momentum() is None) == (momentum is None)
    assert first != digest(outer.global_params)


def test_a_healed_joiner_steps_fragments_to_the_donors_bits():
    cfg = fleet_cfg(fragments=3, outer_momentum=0.9)
    donor = OuterState(tiny_llama(1), cfg)
    gen = torch.Generator().manual_seed(6)
    donor.tentative_step(torch.randn(donor.size(0), generator=gen) * 1e-3, 0)  # momentum of
    donor.commit()  # one fragment only: the others' is sent as zeros
    joiner_model = tiny_llama(2)
    joining = ShardSet(joiner_model, cfg)  # the whole model, one shard
    joiner = joining.outer[0]
    joiner.load_tensor(donor.as_tensor().clone())
    joining.write(joiner_model, None)
    assert torch.equal(flatten(joiner_model), donor.global_params)
    for fragment in (1, 0, None):
        step = torch.randn(donor.size(fragment), generator=gen) * 1e-3
        assert joiner.tentative_step(step.clone(), fragment) == donor.tentative_step(
            step.clone(), fragment
        )
        assert torch.equal(joiner.as_tensor(), donor.as_tensor())


# --- overlap: the merge and the background exchange ----------------------------------------


def test_the_merge_keeps_mix_of_the_local_parameters():
    """Streaming DiLoCo's merge after an overlapped exchange: mix * local + (1 - mix) * global."""
    model = tiny_llama(0)
    shards = ShardSet(model, fleet_cfg(fragments=2))  # the whole model, one shard
    outer = shards.outer[0]
    outer.tentative_step(torch.full((outer.size(1),), 0.1), 1)
    train_a_little(model, seed=3)
    local = flatten(model)
    shards.write(model, 1, 0.5)
    lo, hi = outer.span(1)
    merged = flatten(model)
    # lerp with weight 0.5 computes g - 0.5 fl(g - l) (torch's formula for weights >= 0.5; the
    # halving is exact): two fp32 roundings, <= U32 |g - l| / 2 and <= U32 |result|, so the
    # result is the exact midpoint m within U32 (|g - l| / 2 + |m|), plus higher orders.
    loc, g = local[lo:hi].double(), outer.global_params[lo:hi].double()
    midpoint = (loc + g) / 2
    bound = U32 * ((g - loc).abs() / 2 + midpoint.abs()) * (1 + 2 * U32)
    assert torch.all((merged[lo:hi].double() - midpoint).abs() <= bound)
    assert torch.equal(merged[:lo], local[:lo])
    shards.write(model, 1, 1.0)  # mix 1 keeps the local parameters
    assert torch.equal(flatten(model), merged)
    shards.write(model, 1, 0.0)  # mix 0 takes the global ones
    assert torch.equal(flatten(model)[lo:hi], outer.global_params[lo:hi])


def test_a_background_exchange_hands_back_its_outcome_or_its_error():
    assert send_in_background(lambda: "outcome").land() == "outcome"

    def broken():
        raise TimeoutError("no donor")

    with pytest.raises(TimeoutError, match="no donor"):
        send_in_background(broken).land()


# --- config ------------------------------------------------------------------------------------


def test_streaming_is_off_by_default_and_splits_the_round_budget():
    cfg = load_config(None)
    assert (cfg.fleet.fragments, cfg.fleet.overlap) == (1, 0)
    cfg = load_config(None, ["fleet.budget=steps:20", "fleet.fragments=4", "fleet.overlap=4"])
    member = FleetMember(cfg.fleet, tiny_llama(0), {})
    assert member.budget == 5 and not member.round_due(4, 0.0) and member.round_due(5, 0.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fleet.budget=steps:20", "fleet.fragments=3"], "fleet.fragments = 3: must divide H"),
        (["fleet.budget=steps:20", "fleet.fragments=4", "fleet.overlap=5"], "fleet.overlap = 5"),
        (["fleet.budget=steps:20", "fleet.overlap=20"], r"fleet.overlap = 20: must be < H"),
        (["fleet.budget=seconds:2", "fleet.overlap=1"], "fleet.overlap = 1: counts inner steps"),
        (["fleet.fragments=0"], "fleet.fragments = 0"),
        (["fleet.mix=1.5"], "fleet.mix = 1.5"),
    ],
)
def test_bad_streaming_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
