"""The verifiable tasks GRPO trains on: prompts, and the rule that scores an answer.

`reasoning`: the training problems of the run the policy starts from (its own seed, count and
held-out split, read from that run's config, so the held-out problems are never trained on).
`countdown`: reach a target from given numbers with + - * / (each number at most once); every
task is made by building an expression from its numbers, so each has an answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ostinato.config import DataConfig
from ostinato.data.reasoning import Problem, make_problems
from ostinato.rl.rewards import answer_reward, countdown_reward

Reward = Callable[[str, Any, float], float]


@dataclass(frozen=True)
class Countdown:
    numbers: tuple[int, ...]
    target: int

    @property
    def prompt(self) -> str:
        listed = ", ".join(str(n) for n in self.numbers)
        return f"Question: Use {listed} to make {self.target} with + - * /.\nAnswer:"


def make_countdown(seed: int, split: str, index: int) -> Countdown:
    rng = random.Random(f"countdown:{seed}:{split}:{index}")
    numbers = [rng.randint(1, 12) for _ in range(rng.choice((3, 4)))]
    value = numbers[0]
    for number in numbers[1:]:  # a target some expression reaches, kept a positive integer
        op = rng.choice("+-*") if value > number else rng.choice("+*")
        value = value + number if op == "+" else value - number if op == "-" else value * number
    rng.shuffle(numbers)
    return Countdown(tuple(numbers), value)


@dataclass
class TaskSet:
    train: list[Any]  # each with .prompt
    heldout: list[Any]
    reward: Reward


def task_set(task: str, data: DataConfig) -> TaskSet:
    """The prompts to train on, the held-out ones, and the reward rule. `data` is the data
    section of the run the policy starts from."""
    if task == "countdown":
        train = [make_countdown(data.seed, "train", i) for i in range(data.problems)]
        seen = {t.prompt for t in train}
        heldout = [make_countdown(data.seed, "heldout", i) for i in range(data.heldout * 2)]
        heldout = [t for t in heldout if t.prompt not in seen][: data.heldout]
        return TaskSet(train, heldout, countdown_reward)
    if data.source != "reasoning":
        raise ValueError(
            f"rl.task = reasoning needs a policy trained on data.source = reasoning (the run in "
            f"rl.init used {data.source!r}, which has no verifiable answers); or rl.task = countdown"
        )
    train, heldout = make_problems(data.seed, data.problems, data.heldout)
    return TaskSet(train, heldout, answer_reward)


def expected_of(task: Problem | Countdown) -> str:
    """What a right answer is, for the samples a run prints."""
    return str(task.answer) if isinstance(task, Problem) else f"= {task.target}"
