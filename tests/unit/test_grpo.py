"""GRPO's arithmetic against the formulas, computed here independently in float64 with loops.

Tolerances: the module computes in float32; each per-token term is a handful of float32
operations (exp, multiply, min, clamp), so its relative error is a few ulps (~1e-7 each), and
the mean over N tokens adds at most N ulps: 1e-5 relative covers the tensors here with room."""

import math
import statistics

import pytest
import torch

from ostinato.config import DataConfig
from ostinato.rl.config import RLConfig
from ostinato.rl.grpo import ADVANTAGE_EPS, group_advantages, grpo_loss, token_log_probs
from ostinato.rl.policy import prompts_of
from ostinato.rl.rollout import Rollout, sampling_seed
from ostinato.rl.tasks import task_set
from ostinato.rl.trainer import batch_of

pytestmark = pytest.mark.timeout(60)


def test_advantages_are_each_reward_against_its_group():
    rewards = [1.0, 0.0, 0.0, 1.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    got = group_advantages(torch.tensor(rewards), 4).tolist()
    for g in range(1):
        group = rewards[4 * g : 4 * g + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert got[4 * g + i] == pytest.approx((r - mean) / (std + ADVANTAGE_EPS), rel=1e-5)
    # groups whose answers all score alike teach nothing: exactly 0, though float32's mean of
    # 0.1s is not exactly 0.1 (the eps would otherwise turn that into ~1e-5)
    assert got[4:] == [0.0] * 8


def reference_loss(logp, old, adv, mask, clip, beta, ref, behaviour, cap):
    """The per-token formula of the module docstring, summed in Python floats."""
    total, count, clipped = 0.0, 0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            a = adv[b]
            bounded = min(max(ratio, 1 - clip), 1 + clip)
            surrogate = min(ratio * a, bounded * a)
            weight = 1.0 if behaviour is None else min(math.exp(old[b][t] - behaviour[b][t]), cap)
            term = -weight * surrogate
            if beta:
                gap = ref[b][t] - logp[b][t]
                term += beta * (math.exp(gap) - gap - 1)
            total += term
            count += 1
            clipped += (ratio < 1 - clip and a < 0) or (ratio > 1 + clip and a > 0)
    return total / count, clipped / count


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("stale", [False, True])
def test_the_loss_is_the_clipped_surrogate_with_weights_and_kl(beta, stale):
    gen = torch.Generator().manual_seed(0)
    shape = (3, 5)
    logp = -torch.rand(shape, generator=gen) * 3
    old = logp + (torch.rand(shape, generator=gen) - 0.5)  # ratios from 0.6 to 1.6: some clip
    ref = logp + (torch.rand(shape, generator=gen) - 0.5)
    behaviour = old + (torch.rand(shape, generator=gen) - 0.5) * 3 if stale else None
    adv = torch.tensor([1.5, -0.7, 0.3])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    parts = grpo_loss(logp, old, adv, mask, 0.2, beta, ref, behaviour, 2.0)
    as_lists = [
        x.tolist() if x is not None else None for x in (logp, old, adv, mask, ref, behaviour)
    ]
    want, clip_fraction = reference_loss(*as_lists[:4], 0.2, beta, as_lists[4], as_lists[5], 2.0)
    assert float(parts.loss) == pytest.approx(want, rel=1e-5)
    assert parts.clip_fraction == pytest.approx(clip_fraction)
    assert 0 < parts.clip_fraction < 1  # the case exercises clipping on both sides
    if stale:
        assert parts.importance_weight != 1.0


def test_the_gradient_of_a_fresh_batch_is_the_policy_gradient():
    """At ratio 1 (the update's first pass) the clipped surrogate's gradient is -A * grad logp
    per token, averaged over answer tokens."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    adv, mask = torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [0, 1]])
    grpo_loss(logp, logp.detach(), adv, mask, 0.2).loss.backward()
    expected = torch.tensor([[-2.0, -2.0], [0.0, 1.0]]) / 3
    assert torch.allclose(logp.grad, expected)


def test_token_log_probs_are_of_the_next_token():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 1]])
    got = token_log_probs(logits, tokens)
    for b in range(2):
        for t in range(3):
            want = torch.log_softmax(logits[b, t].double(), -1)[tokens[b, t + 1]]
            assert float(got[b, t]) == pytest.approx(float(want), rel=1e-5)


def test_the_mask_covers_exactly_the_answer_tokens():
    items = [Rollout(None, [5, 6, 7], [8, 9], ""), Rollout(None, [5], [1, 2, 3], "")]
    tokens, mask = batch_of(items)
    assert tokens.tolist() == [[5, 6, 7, 8, 9], [5, 1, 2, 3, 0]]
    # position t predicts token t + 1: answers start after the prompt's last position
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_prompts_follow_a_seeded_order_and_cycle():
    tasks = list(range(10))
    rl = RLConfig(prompts=4, seed=3)
    first = [prompts_of(tasks, rl, step) for step in (1, 2, 3)]
    assert first == [prompts_of(tasks, rl, step) for step in (1, 2, 3)]
    assert sorted(first[0] + first[1] + first[2][:2]) == tasks  # every task before a repeat
    assert prompts_of(tasks, RLConfig(prompts=4, seed=4), 1) != first[0]


def test_sampling_seeds_differ_per_answer_and_version():
    seeds = {sampling_seed(s, v, i) for s in range(3) for v in range(50) for i in range(64)}
    assert len(seeds) == 3 * 50 * 64


def test_heldout_problems_never_become_prompts():
    tasks = task_set("reasoning", DataConfig(problems=500, heldout=50))
    assert not {t.question for t in tasks.heldout} & {t.question for t in tasks.train}
    countdown = task_set("countdown", DataConfig(problems=500, heldout=50))
    assert not {t.prompt for t in countdown.heldout} & {t.prompt for t in countdown.train}
    assert len(countdown.heldout) == 50


def test_a_corpus_without_answers_is_refused_for_the_reasoning_task():
    with pytest.raises(ValueError, match="data.source = reasoning"):
        task_set("reasoning", DataConfig(source="stdlib"))
