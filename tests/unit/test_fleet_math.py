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
from ostinato.fleet.island import RoundClock, schedule_step
from ostinato.fleet.member import FleetMember
from ostinato.fleet.outer import OuterState, digest, flatten
from ostinato.model.llama import Llama
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(60)

SIZES = (1, 2, 7, 127, 128, 129, 1000, 4099)
BLOCKS = (2, 32, 128)


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
    model.init_weights(torch.Generator().manual_seed(seed))
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
    # bf16 keeps 8 significant bits: round to nearest is within 2**-8 relative error.
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
    # round to nearest: |x - q * scale| <= scale / 2, up to the rounding of x / scale itself
    assert torch.all((y - x).abs() <= scales / 2 * (1 + 1e-5) + 1e-30)


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
    scale = max(float(g.abs().max()) for g in gradients) / QMAX[kind]
    bound = scale * (1 + 1 / QMAX[kind])
    with_ef = accumulated_errors(kind, gradients, feedback=True)
    without = accumulated_errors(kind, gradients, feedback=False)
    # with feedback the error telescopes to the last residual: at most half a scale per value
    assert max(with_ef) <= bound / 2 + 1e-4, (max(with_ef), bound)
    assert with_ef[-1] <= bound / 2 + 1e-4
    # without it, the error keeps growing with the rounds
    assert without[-1] > 3 * without[9]
    assert without[-1] > 5 * max(with_ef)
    if same:  # the same rounding error every round: linear growth
        assert without[-1] == pytest.approx(rounds * without[0], rel=1e-3)


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


def test_one_island_h1_fp32_lr1_no_momentum_is_plain_training():
    """One island, H = 1, fp32, outer lr 1 and no momentum: the fleet adds nothing.

    The global parameters after a round are g - 1.0 * (g - l). In floats, g - (g - l) is not
    exactly l (the subtraction g - l rounds), so the fleet model drifts from plain training by an
    ulp or so of the parameters per step; atol=1e-6 allows that and nothing more.
    """
    cfg = fleet_cfg(outer_lr=1.0, outer_momentum=0.0)
    fleet_model = tiny_llama(0)
    plain_model = copy.deepcopy(fleet_model)
    member = FleetMember(cfg, fleet_model, fingerprint={})
    fleet_opt = torch.optim.AdamW(fleet_model.parameters(), lr=1e-2)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        tokens = torch.randint(0, 512, (2, 17), generator=gen)
        for model, opt in ((fleet_model, fleet_opt), (plain_model, plain_opt)):
            opt.zero_grad()
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
        local = flatten(fleet_model)
        packed = member.feedback.compress(member.outer.pseudo_gradient(fleet_model))
        averaged, _ = member._average([torch.cat([packed.to_bytes(), tokens_bytes(32)])], ["a"])
        member.outer.tentative_step(averaged)
        member.outer.commit()
        member.feedback.commit()
        torch.testing.assert_close(member.outer.global_params.detach(), local, atol=1e-6, rtol=0)
        member.outer.load_into(fleet_model)
        torch.testing.assert_close(flatten(fleet_model), flatten(plain_model), atol=1e-6, rtol=0)
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
    outer.tentative_step(outer.pseudo_gradient(model))  # pseudo-gradient = -1 everywhere
    torch.testing.assert_close(outer.global_params.detach(), before + 0.5)


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
    joiner = OuterState(joiner_model, cfg)
    assert not torch.equal(joiner.global_params.detach(), donor.global_params.detach())
    state = donor.as_tensor()
    assert state.numel() == 2 * donor.numel
    joiner.load_tensor(state.clone())
    assert torch.equal(joiner.as_tensor(), donor.as_tensor())
    joiner.load_into(joiner_model)
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
    assert torch.equal(a._average(gathered, ["a", "b"])[0], torch.full((n,), 2.5))
    other, _ = a._average([torch.cat([gathered[0][:-8], tokens_bytes(7)]), gathered[1]], ["a", "b"])
    torch.testing.assert_close(other, torch.full((n,), (7 * 1.0 + 300 * 3.0) / 307))


@pytest.mark.parametrize("compression", KINDS)
def test_average_is_bit_identical_on_every_member(compression):
    a, b = two_members(compression)
    n = a.outer.numel
    gen = torch.Generator().manual_seed(8)
    gathered = []
    for tokens in (1000, 3000, 1234):  # three members, different token counts
        pg = torch.randn(n, generator=gen) * 1e-2
        gathered.append(torch.cat([pack(pg, compression, 64).to_bytes(), tokens_bytes(tokens)]))
    on_a, left_out = a._average([raw.clone() for raw in gathered], ["a", "b", "c"])
    on_b, _ = b._average([raw.clone() for raw in gathered], ["a", "b", "c"])
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
    averaged, left_out = a._average(gathered, ["a", "b", "c"])
    assert left_out == ["c"]
    two, _ = a._average(gathered[:2], ["a", "b"])
    assert torch.equal(averaged, two)
    off = FleetMember(
        fleet_cfg(compression=compression, block=64),
        tiny_llama(10),
        {},
        GuardsConfig(outlier_ratio=0.0),
    )
    poisoned, nothing = off._average(gathered, ["a", "b", "c"])
    assert nothing == [] and poisoned.abs().max() > 1e30


def test_a_time_budget_spreads_the_lr_schedule_over_the_fleets_rounds():
    """With a time budget the schedule follows the rounds: a fast and a slow island stand at
    the same point of it, and it ends with the run instead of at train.steps inner steps."""
    cfg = tiny_config("fleet.budget=seconds:1", "fleet.rounds=10", "train.steps=600")
    cfg.fleet.coordinator = "127.0.0.1:1"

    def at(round_have: int, steps: int, last_steps: int, island_step: int = 9999) -> int:
        member = SimpleNamespace(budget_kind="seconds", round_have=round_have)
        clock = RoundClock()
        clock.steps, clock.last_steps = steps, last_steps
        return schedule_step(cfg, SimpleNamespace(member=member, step=island_step), clock)

    assert at(0, 0, 0) == 0
    assert at(0, 30, 0) == 30  # first round: the nominal 60 steps a round
    assert at(5, 10, 20) == at(5, 40, 80) == 330  # half-way through round 6, fast or slow
    assert at(9, 500, 80) == 600  # a round's share never runs past the round
    steps_cfg = tiny_config("fleet.budget=steps:5")
    steps_member = SimpleNamespace(budget_kind="steps", round_have=3)
    island = SimpleNamespace(member=steps_member, step=17)
    assert schedule_step(steps_cfg, island, RoundClock()) == 17  # a step budget: unchanged
