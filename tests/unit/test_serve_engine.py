"""The serving engine's sampling and its failure isolation, stepped by hand (no threads, no HTTP)."""

from __future__ import annotations

import math

import pytest
import torch

import ostinato.serve.engine as engine_module
from ostinato.model.generate import _nucleus, sample_token
from ostinato.model.llama import Llama
from ostinato.serve.engine import Engine, Sampling
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(60)
EOS = 0
MARK = 7  # a token id that the failing model below refuses to see


def test_extreme_but_valid_sampling_values_pick_the_top_token() -> None:
    logits = torch.tensor([1.0, 3.0, 2.5, -4.0])
    for temperature, top_p in [(1.0, 1e-300), (1e-40, 1.0), (5e-324, 1.0), (1e-40, 1e-300)]:
        generator = torch.Generator().manual_seed(0)
        draws = {sample_token(logits, temperature, top_p, generator) for _ in range(50)}
        assert draws == {1}, (temperature, top_p)


def test_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # p = [0.25, 0.75] at temperature 1
    generator = torch.Generator().manual_seed(0)
    n = 4000
    ones = sum(sample_token(logits, 1.0, 1.0, generator) for _ in range(n))
    # Binomial(n, 0.75): std = sqrt(n * 0.75 * 0.25) ~ 27; 5 std apart fails ~1 run in 1.7e6.
    assert abs(ones - 0.75 * n) < 5 * math.sqrt(n * 0.75 * 0.25)


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    # Sorted: 0.4, 0.3, 0.2, 0.1; the mass before each: 0, 0.4, 0.7, 0.9; kept while < 0.5.
    assert _nucleus(probs.clone(), 0.5).tolist() == [0.0, 0.4, 0.0, 0.3]
    assert _nucleus(probs.clone(), 1e-300).tolist() == [0.0, 0.4, 0.0, 0.0]


def test_non_finite_logits_are_an_error_not_a_token() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        sample_token(torch.tensor([0.0, float("nan")]), 1.0, 1.0, None)


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_config().model).eval()


def run(engine: Engine, prompts: dict[str, tuple[list[int], Sampling]]) -> dict[str, tuple]:
    """Submit every prompt, step until all finished: name -> (tokens, finish reason)."""
    out: dict[str, list] = {name: [[], None] for name in prompts}
    for name, (prompt, sampling) in prompts.items():

        def emit(token, reason, record=out[name]) -> None:
            if token is not None:
                record[0].append(token)
            record[1] = reason

        engine.submit(prompt, sampling, emit)
    for _ in range(100):
        if all(reason is not None for _, reason in out.values()):
            break
        engine.step()
    return {name: (tokens, reason) for name, (tokens, reason) in out.items()}


GOOD = {
    "a": ([5, 9, 11], Sampling(6, ignore_eos=True)),
    "c": ([12, 4], Sampling(6, ignore_eos=True)),
}


def test_a_sequence_whose_sampling_fails_ends_alone(monkeypatch) -> None:
    model = tiny_model()
    alone = run(Engine(model, EOS, max_batch=4), GOOD)
    real = engine_module.sample_token

    def failing(logits, temperature, top_p, generator):
        if temperature == 0.5:  # the bad request's marker
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(engine_module, "sample_token", failing)
    engine = Engine(model, EOS, max_batch=4)
    bad = {"b": ([3, 8], Sampling(6, temperature=0.5, ignore_eos=True))}
    beside = run(engine, {**GOOD, **bad})
    assert beside["b"] == ([], "error")
    assert {name: beside[name] for name in GOOD} == alone
    assert all(reason == "length" and len(tokens) == 6 for tokens, reason in alone.values())
    assert engine.stats["finished_error"] == 1 and engine.stats["finished_length"] == 2
    assert not engine.running and len(engine.free_slots) == 4  # the failed slot is free again


class RefusesMark(torch.nn.Module):
    """The tiny model, failing any forward pass whose input holds MARK (a bad request's batch)."""

    def __init__(self, model: Llama):
        super().__init__()
        self.inner, self.cfg = model, model.cfg

    def forward(self, tokens, **kwargs):
        if bool((tokens == MARK).any()):
            raise RuntimeError("kernel failure")
        return self.inner(tokens, **kwargs)


def test_a_failed_batched_pass_ends_only_the_sequence_that_fails_alone() -> None:
    model = tiny_model()
    alone = run(Engine(model, EOS, max_batch=4), GOOD)
    engine = Engine(RefusesMark(model), EOS, max_batch=4)
    beside = run(engine, {**GOOD, "b": ([3, MARK], Sampling(6, ignore_eos=True))})
    assert beside["b"] == ([], "error")
    # Retried one by one, the others give exactly what they give without the bad one.
    assert {name: beside[name] for name in GOOD} == alone
    assert engine.stats["finished_error"] == 1


def test_a_client_that_cannot_be_told_ends_alone() -> None:
    """emit raises (the server's event loop is closed): that sequence ends, the others go on."""
    model = tiny_model()
    alone = run(Engine(model, EOS, max_batch=4), GOOD)
    engine = Engine(model, EOS, max_batch=4)
    calls = []

    def gone(token, reason) -> None:
        calls.append(reason)
        raise RuntimeError("Event loop is closed")

    engine.submit([3, 8], Sampling(6, ignore_eos=True), gone)
    beside = run(engine, GOOD)
    assert beside == alone
    assert calls == [None, "error"]  # its first token, then the end it could not be told
    assert engine.stats["finished_error"] == 1 and len(engine.free_slots) == 4
