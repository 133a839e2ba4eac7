"""Rollouts: groups of sampled answers per prompt, generated with `ostinato serve`'s engine.

Each call drives a fresh engine step by step in this thread (no server, no background thread),
so which sequences share a batched pass, and in which rows, is a pure function of the prompts:
with every answer's sampling seed fixed by (rl.seed, update, answer), the same policy gives the
same rollouts bit for bit, which a resumed run relies on. In the trainer's own process the
engine reads the policy's parameters, so there a weight push is free; rollout islands
(ostinato.rl.island) run the same function on the weights the trainer published.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.data.tokenizer import eos_id
from ostinato.model.llama import Llama
from ostinato.rl.rewards import safe_reward
from ostinato.rl.tasks import Reward
from ostinato.serve.engine import Engine, Sampling


@dataclass
class Rollout:
    task: Any
    prompt: list[int]
    answer: list[int]  # generated ids, ending with the end-of-text id when the answer stopped
    text: str
    reward: float = 0.0
    version: int = 0  # the policy version (updates done) that generated it
    behaviour: list[float] | None = None  # its per-token log-probs under that policy


@dataclass
class Generated:
    rollouts: list[Rollout] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0  # the trainer's: generating, or waiting for rollout islands

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sampling_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of answer `index` of the rollouts of update `step` (0-based)."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


def work_of(tasks: list[Any], group_size: int, seed: int, step: int) -> tuple[list[str], list[int]]:
    """The prompts of update `step` (1-based), each `group_size` times, and their seeds."""
    prompts = [task.prompt for task in tasks for _ in range(group_size)]
    return prompts, [sampling_seed(seed, step - 1, i) for i in range(len(prompts))]


@torch.no_grad()
def generate(
    model: Llama,
    tokenizer: Tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
    max_batch: int = 64,
) -> tuple[list[list[int]], list[bool], float]:
    """Answer ids per prompt (with the stop id appended to an answer that stopped), whether each
    stopped, and the seconds it took. temperature 0: greedy."""
    stop = eos_id(tokenizer)
    engine = Engine(model, stop, max_batch=max(1, min(max_batch, len(prompts))))
    answers: list[list[int]] = [[] for _ in prompts]
    stopped, done = [False] * len(prompts), [False] * len(prompts)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        sampling = Sampling(max_new_tokens, temperature, seed=None if seeds is None else seeds[i])

        def emit(token: int | None, reason: str | None, i: int = i) -> None:
            if token is not None:
                answers[i].append(token)
            if reason is not None:
                done[i], stopped[i] = True, reason == "stop"

        engine.submit(ids, sampling, emit)
    while not all(done):
        engine.step()
    for answer, ended in zip(answers, stopped, strict=True):
        if ended:
            answer.append(stop)
    return answers, stopped, time.perf_counter() - started


def scored(
    tokenizer: Tokenizer,
    tasks: list[Any],
    group_size: int,
    answers: list[list[int]],
    versions: list[int],
    reward: Reward,
    format_weight: float,
    behaviour: list[list[float] | None] | None = None,
) -> Generated:
    """The rollouts of `answers` (grouped by task in order), with their rewards."""
    out = Generated()
    for i, answer in enumerate(answers):
        task = tasks[i // group_size]
        text = tokenizer.decode(answer)
        prompt = tokenizer.encode(task.prompt, add_special_tokens=False).ids
        score = safe_reward(reward, text, task, format_weight)
        logp = None if behaviour is None else behaviour[i]
        out.rollouts.append(Rollout(task, prompt, answer, text, score, versions[i], logp))
        out.tokens += len(answer)
    return out


def rollouts(
    model: Llama,
    tokenizer: Tokenizer,
    tasks: list[Any],
    reward: Reward,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    step: int,
    format_weight: float,
) -> Generated:
    """`group_size` sampled answers to each task by the policy itself (version step - 1)."""
    prompts, seeds = work_of(tasks, group_size, seed, step)
    answers, _, seconds = generate(model, tokenizer, prompts, max_new_tokens, temperature, seeds)
    versions = [step - 1] * len(answers)
    out = scored(tokenizer, tasks, group_size, answers, versions, reward, format_weight)
    out.seconds = seconds
    return out


def accuracy(
    model: Llama, tokenizer: Tokenizer, tasks: list[Any], reward: Reward, max_new_tokens: int
) -> tuple[float, list[tuple[Any, str]]]:
    """Share of `tasks` answered right, greedily (the format reward not counted); and each
    task with its answer."""
    if not tasks:
        return 0.0, []
    prompts = [task.prompt for task in tasks]
    answers, _, _ = generate(model, tokenizer, prompts, max_new_tokens)
    texts = [tokenizer.decode(answer) for answer in answers]
    right = [
        safe_reward(reward, text, task, 0.0) >= 1.0 for text, task in zip(texts, tasks, strict=True)
    ]
    return sum(right) / len(tasks), list(zip(tasks, texts, strict=True))
