"""A built-in reasoning corpus: small arithmetic and word problems with worked solutions.

Every problem is generated from (seed, split, index), so the corpus is the same on every machine
without a download. Each solution ends with `#### ANSWER`, which makes accuracy checkable.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ANSWER_MARK = "####"
_ANSWER_RE = re.compile(r"####\s*(-?\d+)")
NAMES = ("Ann", "Bo", "Carl", "Dina", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "books", "coins", "marbles", "pens", "shells", "stamps", "cards")


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # worked steps, ending with "#### answer"
    answer: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.solution}"


def _addition(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    tens = a // 10 + b // 10
    steps = f"{a % 10} + {b % 10} = {ones}. {a // 10}0 + {b // 10}0 = {tens}0. {tens}0 + {ones} = {a + b}."
    return Problem(f"What is {a} + {b}?", f"{steps} {ANSWER_MARK} {a + b}", a + b)


def _subtraction(rng: random.Random) -> Problem:
    a, b = rng.randint(20, 99), rng.randint(10, 99)
    a, b = max(a, b), min(a, b)
    steps = f"{a} - {b // 10}0 = {a - b // 10 * 10}. {a - b // 10 * 10} - {b % 10} = {a - b}."
    return Problem(f"What is {a} - {b}?", f"{steps} {ANSWER_MARK} {a - b}", a - b)


def _multiplication(rng: random.Random) -> Problem:
    a, b = rng.randint(11, 49), rng.randint(2, 9)
    high, low = a // 10 * 10 * b, a % 10 * b
    steps = f"{a // 10}0 * {b} = {high}. {a % 10} * {b} = {low}. {high} + {low} = {a * b}."
    return Problem(f"What is {a} * {b}?", f"{steps} {ANSWER_MARK} {a * b}", a * b)


def _word_problem(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, more = rng.randint(5, 40), rng.randint(2, 30)
    away = rng.randint(1, start + more - 1)
    total = start + more
    question = (
        f"{name} has {start} {item}. {name} gets {more} more and gives away {away}. "
        f"How many {item} does {name} have now?"
    )
    steps = f"{start} + {more} = {total}. {total} - {away} = {total - away}."
    return Problem(question, f"{steps} {ANSWER_MARK} {total - away}", total - away)


GENERATORS = (_addition, _subtraction, _multiplication, _word_problem)


def make_problem(seed: int, split: str, index: int) -> Problem:
    rng = random.Random(f"{seed}:{split}:{index}")
    return rng.choice(GENERATORS)(rng)


def make_problems(seed: int, count: int, heldout: int) -> tuple[list[Problem], list[Problem]]:
    """`count` training problems and `heldout` others whose questions never occur in training."""
    train = [make_problem(seed, "train", i) for i in range(count)]
    seen = {p.question for p in train}
    held: list[Problem] = []
    index = 0
    while len(held) < heldout:
        problem = make_problem(seed, "heldout", index)
        index += 1
        if problem.question not in seen:
            seen.add(problem.question)
            held.append(problem)
    return train, held


def extract_answer(text: str) -> int | None:
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None
