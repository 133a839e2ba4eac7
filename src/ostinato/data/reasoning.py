"""A built-in reasoning corpus: small arithmetic and word problems with worked solutions.

Every problem is generated from (seed, split, index), so the corpus is the same on every machine
without a download. Each solution ends with `#### ANSWER`, which makes accuracy checkable.
Solutions work the way a small model can learn to (with the tokenizer's one token per digit):
column addition and subtraction with carries and borrows, multiplication digit by digit, a word
problem as a chain of those, each step one digit-level operation, then the whole result.
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


def _digits(n: int) -> list[int]:
    """The digits of n >= 0, ones first: the order a column method works in."""
    return [int(c) for c in reversed(str(n))]


def column_sum(a: int, b: int) -> str:
    """a + b as a column addition, ones first, one digit-level step per column: the sum of the
    column with what was carried, the digit written, what is carried on."""
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = da[i] if i < len(da) else 0, db[i] if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = total // 10
        steps.append(f"{terms} = {total}, write {total % 10}" + (", carry 1." if carry else "."))
    if carry:
        steps.append("write 1.")
    return f"{' '.join(steps)} So {a} + {b} = {a + b}."


def column_difference(a: int, b: int) -> str:
    """a - b (a >= b) as a column subtraction, ones first: a column too small borrows 10 from
    the next, which then gives 1 back."""
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], db[i] if i < len(db) else 0
        top = x - borrow
        lent = f"{x} - 1 = {top}, " if borrow else ""
        borrow = int(top < y)
        top += 10 * borrow
        steps.append(f"{lent}{top} - {y} = {top - y}" + (", borrow 1." if borrow else "."))
    return f"{' '.join(steps)} So {a} - {b} = {a - b}."


def column_product(a: int, b: int) -> str:
    """a * b (b one digit) digit by digit of a, ones first, carrying the tens of each product."""
    da = _digits(a)
    steps, carry = [], 0
    for i, d in enumerate(da):
        product = d * b
        text = f"{d} * {b} = {product}"
        if carry:
            text += f", {product} + {carry} = {product + carry}"
        product += carry
        if i == len(da) - 1:
            steps.append(f"{text}, write {product}.")
        else:
            carry = product // 10
            steps.append(f"{text}, write {product % 10}" + (f", carry {carry}." if carry else "."))
    return f"{' '.join(steps)} So {a} * {b} = {a * b}."


def _addition(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Problem(f"What is {a} + {b}?", f"{column_sum(a, b)} {ANSWER_MARK} {a + b}", a + b)


def _subtraction(rng: random.Random) -> Problem:
    a, b = rng.randint(20, 99), rng.randint(10, 99)
    a, b = max(a, b), min(a, b)
    steps = column_difference(a, b)
    return Problem(f"What is {a} - {b}?", f"{steps} {ANSWER_MARK} {a - b}", a - b)


def _multiplication(rng: random.Random) -> Problem:
    a, b = rng.randint(11, 49), rng.randint(2, 9)
    steps = column_product(a, b)
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
    steps = f"{column_sum(start, more)} {column_difference(total, away)}"
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
