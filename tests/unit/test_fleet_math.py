"""The fleet's math without processes: compression, error feedback, the outer step, averaging."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ostinato.config import FleetConfig, GuardsConfig, load_config
from ostinato.fleet.compress import (
    KINDS,
    QMAX,
    ErrorFeedback,
    from_bytes,
    pack,
    payload_size,
    unpack,
)
from ostinato.fleet.island import FleetIsland, RoundClock, time_budget_step
from ostinato.fleet.member import FleetMember
from ostinato.fleet.outer import OuterState, digest, flatten, outer_lr_of
from ostinato.fleet.shards import ShardSet
from ostinato.model.llama import Llama
from tests.unit.local_rounds import average_of

pytestmark = pytest.mark.timeout(60)

SIZES = (1, 2, 7, 127, 128, 129, 1000, 4099)
BLOCKS = (2, 32, 128)
# Unit roundoff of fp32 (round to nearest): one +, -, * or / of fp32 values is off by at most
# U32 times the exact result's magnitude (IEEE 754 rounds every one of them correctly, on every
# CPU; only sums of many terms, whose order a kernel chooses, differ between CPUs). The bounds
# below count such roundings, and are checked in float64, where the check itself is exact.
U32 = 2.0**-24


def tokens_bytes(tokens: float) -> torch.Tensor:
    """The token count a member appends to its packed pseudo-gradient (member._attempt)."""
    return torch.tensor([float(tokens)], dtype=torch.float64).view(torch.uint8)


def block_scales(x: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """Per value: the scale of its block (block absmax / qmax)."""
    padded = torch.nn.functional.pad(x, (0, -x.numel() % block)).view(-1, block)
    scales = padded.abs().amax(dim=1) / QMAX[kind]
    return scales.repeat_interleave(block)[: x.numel()]


def tiny_llama(seed: int) -> Llama:
    model = Llama(load_config(None, ["model.size=tiny"]).model)
    model.init_weights(seed)
    return model


# --- compression ------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", SIZES)
def test_fp32_round_trip_is_exact(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    assert torch.equal(unpack(pack(x, "fp32")), x)


@pytest.mark.parametrize("numel", SIZES)
def test_bf16_round_trip_within_bf16_precision(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3
    y = unpack(pack(x, "bf16"))
    assert y.dtype == torch.float32 and y.shape == x.shape
    # bf16 keeps 8 significant bits: round to nearest is within 2**-8 relative error. The check
    # is exact in fp32: y - x only drops bits x has beyond y's 8, and * 2**-8 is a power of two.
    assert torch.all((y - x).abs() <= x.abs() * 2.0**-8)
    assert torch.equal(y, x.to(torch.bfloat16).float())


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("numel", SIZES)
def test_int_round_trip_within_half_a_scale_per_block(kind, block, numel):
    gen = torch.Generator().manual_seed(numel * 7 + block)
    # blocks of very different magnitudes, so a shared scale would fail the bound
    x = torch.randn(numel, generator=gen) * torch.logspace(-3, 2, numel)
    packed = pack(x, kind, block)
    y = unpack(packed, block)
    assert y.shape == x.shape
    scales = block_scales(x, kind, block)
    torch.testing.assert_close(
        packed.scales.repeat_interleave(block)[:numel], scales, rtol=0, atol=0
    )
    # y = fl(q * s) with q = round(fl(x / s)): y - x = (q - x/s) s + (x/s) s d1 + q s d2 with
    # |q - fl(x / s)| <= 1/2 and |d1|, |d2| <= U32, and |x| / s, |q| <= qmax, so
    # |y - x| <= s / 2 + 2 qmax U32 s.
    bound = scales.double() * (0.5 + 2 * QMAX[kind] * U32)
    assert torch.all((y.double() - x.double()).abs() <= bound)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_all_zero_blocks_decode_to_zero(kind):
    x = torch.zeros(300)
    x[130:140] = torch.linspace(-1, 1, 10)  # block 1 of 3 is non-zero, blocks 0 and 2 are zero
    packed = pack(x, kind, 128)
    assert packed.scales[0] == 0 and packed.scales[2] == 0
    y = unpack(packed, 128)
    assert torch.all(torch.isfinite(y))
    assert torch.equal(y[:128], torch.zeros(128)) and torch.equal(y[256:], torch.zeros(44))
    assert torch.equal(unpack(pack(torch.zeros(5), kind, 4), 4), torch.zeros(5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("numel", SIZES)
def test_payload_size_and_bytes_round_trip(kind, block, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    packed = pack(x, kind, block)
    raw = packed.to_bytes()
    assert raw.dtype == torch.uint8
    assert len(raw) == payload_size(numel, kind, block) == packed.wire_bytes
    back = from_bytes(raw.clone(), numel, kind, block)
    assert back.kind == kind and back.numel == numel
    assert torch.equal(back.payload, packed.payload)
    assert torch.equal(back.scales, packed.scales)
    assert torch.equal(unpack(back, block), unpack(packed, block))


def test_sizes_shrink_with_compression():
    numel = 128 * 100
    sizes = [payload_size(numel, kind, 128) for kind in KINDS]
    assert sizes == [4 * numel, 2 * numel, numel + 400, numel // 2 + 400]


def test_unknown_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="int2.*fp32, bf16, int8, int4"):
        pack(torch.ones(4), "int2")


def test_int4_needs_an_even_block_size():
    # Two 4-bit values share a byte; the config refuses odd blocks and so does pack().
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(5), "int4", 5)


# --- error feedback ---------------------------------------------------------------------------


def accumulated_errors(kind, gradients, feedback: bool, block=32):
    """max |sum(sent) - sum(true)| after each round, in float64."""
    numel = gradients[0].numel()
    ef = ErrorFeedback(numel, kind, block)
    sent = torch.zeros(numel, dtype=torch.float64)
    true = torch.zeros(numel, dtype=torch.float64)
    errors = []
    for g in gradients:
        if feedback:
            packed = ef.compress(g)
            ef.commit()
        else:
            packed = pack(g, kind, block)
        sent += unpack(packed, block).double()
        true += g.double()
        errors.append(float((sent - true).abs().max()))
    return errors


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("same", [True, False], ids=["same", "random"])
def test_error_feedback_keeps_the_accumulated_error_bounded(kind, same):
    gen = torch.Generator().manual_seed(3)
    numel, rounds = 1000, 200
    first = torch.randn(numel, generator=gen)
    gradients = [first if same else torch.randn(numel, generator=gen) for _ in range(rounds)]
    # one block scale of the largest pseudo-gradient, plus the residual it may carry
    largest = max(float(g.abs().max()) for g in gradients)
    scale = largest / QMAX[kind]
    bound = scale * (1 + 1 / QMAX[kind])
    # With feedback, sent - true telescopes to -(last residual) plus one fp32 rounding per round
    # of corrected = g + residual (<= U32 (|g| + bound)); the residual c - unpack(c) is exact
    # (Sterbenz) and within half a scale plus the int round trip's 2 qmax U32 scale.
    rounding = rounds * U32 * (largest + bound) + (2 * QMAX[kind] + 1) * U32 * bound
    with_ef = accumulated_errors(kind, gradients, feedback=True)
    without = accumulated_errors(kind, gradients, feedback=False)
    assert max(with_ef) <= bound / 2 + rounding, (max(with_ef), bound)
    assert with_ef[-1] <= bound / 2 + rounding
    # without it, the error keeps growing with the rounds
    assert without[-1] > 3 * without[9]
    assert without[-1] > 5 * max(with_ef)
    if same:  # the same rounding error every round: linear growth, k * (y - g) after k rounds,
        # up to float64's rounding of the two running sums (each term <= rounds * largest).
        float64_sums = 2 * rounds * rounds * largest * 2.0**-53
        assert without[-1] == pytest.approx(rounds * without[0], rel=0, abs=float64_sums)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_error_feedback_keeps_the_residual_only_on_commit(kind):
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(300, generator=gen)
    ef = ErrorFeedback(300, kind, 64)
    first = ef.compress(g).to_bytes()
    retried = ef.compress(g).to_bytes()  # a failed attempt, retried: the same bytes
    assert torch.equal(first, retried)
    assert torch.equal(ef.residual, torch.zeros(300))
    expected_residual = g - unpack(pack(g, kind, 64), 64)
    ef.commit()
    assert torch.equal(ef.residual, expected_residual)
    ef.commit()  # a second commit without a compress keeps it
    assert torch.equal(ef.residual, expected_residual)
    nxt = ef.compress(g).to_bytes()
    assert torch.equal(nxt, pack(g + expected_residual, kind, 64).to_bytes())


def test_error_feedback_carry_adds_unsent_work():
    ef = ErrorFeedback(4, "fp32", 2)
    ef.carry(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = unpack(ef.compress(torch.ones(4)), 2)
    assert torch.equal(out, torch.tensor([2.0, 3.0, 4.0, 5.0]))
    state = ef.state_dict()
    other = ErrorFeedback(4, "fp32", 2)
    other.load_state_dict(state)
    assert torch.equal(other.residual, ef.residual)
    assert other.residual is not ef.residual


# --- the outer step ---------------------------------------------------------------------------


def fleet_cfg(**overrides) -> FleetConfig:
    return FleetConfig(**{"compression": "fp32", "island": "a", **overrides})


def test_auto_outer_lr_follows_the_islands_expected():
    """The paper's best outer rate by replicas (0.4 alone, 0.6 for 2-4, 0.8 from 8), from
    fleet.expect; a number set in the config is used as it is."""
    rates = {n: outer_lr_of(fleet_cfg(expect=n))[0] for n in (1, 2, 3, 4, 6, 8, 64)}
    assert rates == {1: 0.4, 2: 0.6, 3: 0.6, 4: 0.6, 6: 0.7, 8: 0.8, 64: 0.8}
    lr, why = outer_lr_of(fleet_cfg(expect=0))
    assert lr == 0.6 and "2-4 assumed" in why
    assert outer_lr_of(fleet_cfg(outer_lr=0.25, expect=8)) == (0.25, "fleet.outer_lr")
    outer = OuterState(nn.Linear(2, 2), fleet_cfg(expect=8))
    assert outer.lr == 0.8
    outer.set_lr(0.5)
    assert outer.optimizer.param_groups[0]["lr"] == 0.5


def test_one_island_h1_fp32_lr1_no_momentum_is_plain_training():
    """One island, H = 1, fp32, outer lr 1 and no momentum: the fleet adds nothing but the
    rounding of two fp32 subtractions per round.

    Each round, plain training takes the same step from the same parameters and optimizer state
    (both models start the round equal, so their gradients, and so AdamW's moments, are equal
    bit for bit), which gives the local parameters l. The fleet then sends the pseudo-gradient
    fl(g - l), averages it alone (weight 1: exact) and steps g - 1.0 * p: its new global
    parameters are fl(g - fl(g - l)) bit for bit (each fp32 subtraction is correctly rounded on
    every CPU). That is l up to |fl(g - l) - (g - l)| <= U32 |g - l| plus the last rounding,
    <= U32 |g - p|: checked elementwise. Compared with an independent plain run instead, those
    ulps would pass through AdamW's normalisation, which no bound derives (what broke this test
    on AVX-512 CPUs).
    """
    cfg = fleet_cfg(outer_lr=1.0, outer_momentum=0.0)
    fleet_model = tiny_llama(0)
    plain_model = copy.deepcopy(fleet_model)
    member = FleetMember(cfg, fleet_model, fingerprint={})
    fleet_opt = torch.optim.AdamW(fleet_model.parameters(), lr=1e-2)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    moved = 0
    for _ in range(4):
        with torch.no_grad():  # the round starts from the fleet's parameters
            for plain, fleet in zip(
                plain_model.parameters(), fleet_model.parameters(), strict=True
            ):
                plain.copy_(fleet)
        start = flatten(fleet_model)
        assert torch.equal(member.outer.global_params.detach(), start)
        tokens = torch.randint(0, 512, (2, 17), generator=gen)
        for model, opt in ((fleet_model, fleet_opt), (plain_model, plain_opt)):
            opt.zero_grad()
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
        local = flatten(plain_model)
        assert torch.equal(flatten(fleet_model), local)
        member.prepare(fleet_model)
        pseudo_gradient = member.shards.prepared[0]
        assert torch.equal(pseudo_gradient, start - local)
        packed = member.feedback.compress(pseudo_gradient)
        averaged, _ = average_of(member, [torch.cat([packed.to_bytes(), tokens_bytes(32)])], ["a"])
        assert torch.equal(averaged, pseudo_gradient)
        member.outer.tentative_step(averaged)
        member.outer.commit()
        member.feedback.commit()
        new = member.outer.global_params.detach()
        assert torch.equal(new, start - pseudo_gradient)
        g, p, loc = start.double(), pseudo_gradient.double(), local.double()
        bound = U32 * ((g - loc).abs() + (g - p).abs())
        assert torch.all((new.double() - loc).abs() <= bound)
        moved += int((new != local).sum())
        member.shards.write(fleet_model, None)
        assert torch.equal(flatten(fleet_model), new)
    assert moved > 0  # the rounding is real: the bound, not equality, is what holds
    assert torch.equal(member.feedback.residual, torch.zeros_like(member.feedback.residual))


def test_outer_state_is_torch_nesterov_sgd_bit_for_bit():
    model = nn.Linear(7, 5)
    outer = OuterState(model, fleet_cfg(outer_lr=0.7, outer_momentum=0.9))
    reference = nn.Parameter(flatten(model).clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        pseudo_gradient = torch.randn(outer.numel, generator=gen)
        outer.tentative_step(pseudo_gradient.clone())
        outer.commit()
        reference.grad = pseudo_gradient.clone()
        sgd.step()
        assert torch.equal(outer.global_params.detach(), reference.detach())
        assert torch.equal(outer._momentum(), sgd.state[reference]["momentum_buffer"])
    assert digest(outer.global_params.detach()) == digest(reference.detach())


def test_outer_step_moves_against_the_pseudo_gradient():
    model = nn.Linear(3, 2)
    outer = OuterState(model, fleet_cfg(outer_lr=0.5, outer_momentum=0.0))
    before = outer.global_params.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    outer.tentative_step(outer.global_params - flatten(model))  # pseudo-gradient = -1
    # fl(g - 0.5 fl(g - fl(g + 1))): three roundings, each <= U32 of a value <= |g| + 1
    # (the halving is exact), so the result is g + 0.5 within 3 U32 (|g| + 1).
    g = before.double()
    error = (outer.global_params.detach().double() - (g + 0.5)).abs()
    assert torch.all(error <= 3 * U32 * (g.abs() + 1))


@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "with-momentum"])
def test_tentative_step_then_abort_restores_everything(warm):
    model = nn.Linear(9, 4)
    outer = OuterState(model, fleet_cfg(outer_lr=0.7, outer_momentum=0.9))
    gen = torch.Generator().manual_seed(4)
    if warm:
        outer.tentative_step(torch.randn(outer.numel, generator=gen))
        outer.commit()
    params = outer.global_params.detach().clone()
    momentum = None if outer._momentum() is None else outer._momentum().clone()
    step = torch.randn(outer.numel, generator=gen)
    first = outer.tentative_step(step.clone())
    assert not torch.equal(outer.global_params.detach(), params)
    outer.abort()
    assert torch.equal(outer.global_params.detach(), params)
    if momentum is None:
        assert outer._momentum() is None
    else:
        assert torch.equal(outer._momentum(), momentum)
    outer.abort()  # a second abort is a no-op
    assert torch.equal(outer.global_params.detach(), params)
    again = outer.tentative_step(step.clone())
    assert again == first == digest(outer.global_params.detach())
    outer.commit()
    outer.abort()  # nothing to undo after a commit
    assert digest(outer.global_params.detach()) == first


@pytest.mark.parametrize("warm", [False, True], ids=["no-momentum-yet", "with-momentum"])
def test_as_tensor_load_tensor_round_trip(warm):
    cfg = fleet_cfg(outer_lr=0.7, outer_momentum=0.9)
    donor = OuterState(tiny_llama(1), cfg)
    gen = torch.Generator().manual_seed(6)
    if warm:
        for _ in range(2):
            donor.tentative_step(torch.randn(donor.numel, generator=gen) * 1e-3)
            donor.commit()
    joiner_model = tiny_llama(2)
    joining = ShardSet(joiner_model, cfg)  # the whole model, one shard
    joiner = joining.outer[0]
    assert not torch.equal(joiner.global_params.detach(), donor.global_params.detach())
    state = donor.as_tensor()
    assert state.numel() == 2 * donor.numel
    joiner.load_tensor(state.clone())
    assert torch.equal(joiner.as_tensor(), donor.as_tensor())
    joining.write(joiner_model, None)
    assert torch.equal(flatten(joiner_model), donor.global_params.detach())
    # the healed island steps to the same bits as the donor
    step = torch.randn(donor.numel, generator=gen) * 1e-3
    assert joiner.tentative_step(step.clone()) == donor.tentative_step(step.clone())
    assert torch.equal(joiner.as_tensor(), donor.as_tensor())
    restored = OuterState(tiny_llama(3), cfg)
    restored.load_state_dict(donor.state_dict())
    assert torch.equal(restored.as_tensor(), donor.as_tensor())


# --- token-weighted average -------------------------------------------------------------------


def two_members(compression: str, block: int = 64) -> tuple[FleetMember, FleetMember]:
    cfg_a = fleet_cfg(island="a", compression=compression, block=block)
    cfg_b = fleet_cfg(island="b", compression=compression, block=block)
    return FleetMember(cfg_a, tiny_llama(10), {}), FleetMember(cfg_b, tiny_llama(11), {})


def test_average_weights_by_tokens():
    a, _ = two_members("fp32")
    n = a.outer.numel
    gathered = [
        torch.cat([pack(torch.full((n,), 1.0), "fp32").to_bytes(), tokens_bytes(100)]),
        torch.cat([pack(torch.full((n,), 3.0), "fp32").to_bytes(), tokens_bytes(300)]),
    ]
    # 0.25 * 1 + 0.75 * 3 = 2.5, exactly in floats
    assert torch.equal(average_of(a, gathered, ["a", "b"])[0], torch.full((n,), 2.5))
    other, _ = average_of(
        a, [torch.cat([gathered[0][:-8], tokens_bytes(7)]), gathered[1]], ["a", "b"]
    )
    # (7/307) * 1 + (300/307) * 3 in fp32: the two weights, one product and the sum each round
    # once, by at most U32 of a term <= the result: within 4 U32 of it, 5 with higher orders.
    exact = (7 * 1.0 + 300 * 3.0) / 307
    assert torch.all((other.double() - exact).abs() <= 5 * U32 * exact)  # + u**2 terms


@pytest.mark.parametrize("compression", KINDS)
def test_average_is_bit_identical_on_every_member(compression):
    a, b = two_members(compression)
    n = a.outer.numel
    gen = torch.Generator().manual_seed(8)
    gathered = []
    for tokens in (1000, 3000, 1234):  # three members, different token counts
        pg = torch.randn(n, generator=gen) * 1e-2
        gathered.append(torch.cat([pack(pg, compression, 64).to_bytes(), tokens_bytes(tokens)]))
    on_a, left_out = average_of(a, [raw.clone() for raw in gathered], ["a", "b", "c"])
    on_b, _ = average_of(b, [raw.clone() for raw in gathered], ["a", "b", "c"])
    assert torch.equal(on_a, on_b) and left_out == []
    expected = torch.zeros(n)
    total = 1000.0 + 3000.0 + 1234.0
    for raw, tokens in zip(gathered, (1000, 3000, 1234), strict=True):
        expected += (tokens / total) * unpack(from_bytes(raw[:-8], n, compression, 64), 64)
    assert torch.equal(on_a, expected)
    # and so the outer steps agree too: the digests the coordinator compares are equal
    b.outer.load_tensor(a.outer.as_tensor())
    assert a.outer.tentative_step(on_a) == b.outer.tentative_step(on_b)


@pytest.mark.parametrize("compression", KINDS)
def test_a_corrupted_pseudo_gradient_is_left_out_of_the_average(compression):
    """A flipped exponent bit makes one value ~1e36: averaged in, it would reach every island."""
    a, _ = two_members(compression)
    n = a.outer.numel
    gen = torch.Generator().manual_seed(3)
    clean = [torch.randn(n, generator=gen) * 1e-2 for _ in range(3)]
    corrupted = clean[2].clone()
    corrupted[5] = corrupted[5].abs().view(torch.int32).bitwise_or(1 << 30).view(torch.float32)
    gathered = [
        torch.cat([pack(pg, compression, 64).to_bytes(), tokens_bytes(100)])
        for pg in (clean[0], clean[1], corrupted)
    ]
    averaged, left_out = average_of(a, gathered, ["a", "b", "c"])
    assert left_out == ["c"]
    two, _ = average_of(a, gathered[:2], ["a", "b"])
    assert torch.equal(averaged, two)
    off = FleetMember(
        fleet_cfg(compression=compression, block=64),
        tiny_llama(10),
        {},
        GuardsConfig(outlier_ratio=0.0),
    )
    poisoned, nothing = average_of(off, gathered, ["a", "b", "c"])
    assert nothing == [] and poisoned.abs().max() > 1e30


def test_a_time_budget_spreads_the_lr_schedule_over_the_fleets_rounds():
    """With a time budget the schedule follows the rounds: a fast and a slow island stand at
    the same point of it, and it ends with the run instead of at train.steps inner steps."""

    def at(round_have: int, steps: int, last_steps: int) -> int:
        clock = RoundClock()
        clock.steps, clock.last_steps = steps, last_steps
        return time_budget_step(600, 10, round_have, clock)  # train.steps=600, fleet.rounds=10

    assert at(0, 0, 0) == 0
    assert at(0, 30, 0) == 30  # first round: the nominal 60 steps a round
    assert at(5, 10, 20) == at(5, 40, 80) == 330  # half-way through round 6, fast or slow
    assert at(9, 500, 80) == 600  # a round's share never runs past the round


def test_on_a_step_budget_the_schedule_follows_the_fleet_not_a_restarted_islands_steps():
    """H = 5. An island never struck is at its own step; one restarted from its checkpoint at
    step 10 and healed to round 6 stands where the fleet does (a restarted island that kept its
    own count would end the run with the learning rate of 30 steps earlier)."""
    clock = RoundClock()
    member = SimpleNamespace(budget_kind="steps", round_have=3, budget=5.0, warm_rounds=0)
    island = SimpleNamespace(member=member, clock=clock)
    clock.steps = 2
    assert FleetIsland.schedule_step(island, 17) == 17  # 3 rounds of 5, 2 steps into the 4th
    member.round_have = 6  # healed: the fleet committed rounds 4-6 without it
    assert FleetIsland.schedule_step(island, 12) == 32
    clock.in_flight = object()  # fleet.overlap: round 7 in flight, 2 steps into round 8
    assert FleetIsland.schedule_step(island, 37) == 37
