"""Rule rewards on verifiable tasks: the answer after `####`, and the format.

An answer counts only in the one form the corpus teaches: the completion ends with exactly one
`#### N` (an integer of at most MAX_DIGITS digits), nothing after it. Hedging with two marks
(`#### 12 #### 13`), an empty mark or a number too long to be an answer gets no reward: a policy
must not learn to game the parser. A reward function that raises gives zero (logged): one odd
completion never stops a run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from ostinato.data.reasoning import ANSWER_MARK

log = logging.getLogger("ostinato")
MAX_DIGITS = 18
_FINAL = re.compile(r"####[ \t]*(-?\d{1," + str(MAX_DIGITS) + r"})\.?\s*\Z")


def final_answer(text: str) -> int | None:
    """The integer of a completion that ends with exactly one `#### N`; None otherwise."""
    if text.count(ANSWER_MARK) != 1:
        return None
    match = _FINAL.search(text)
    return int(match.group(1)) if match else None


def answer_reward(text: str, task: Any, format_weight: float) -> float:
    """1 for the right integer (`task.answer`), plus `format_weight` for the right form (right
    or wrong)."""
    got = final_answer(text)
    if got is None:
        return 0.0
    return float(got == task.answer) + format_weight


def countdown_reward(text: str, task: Any, format_weight: float) -> float:
    """The countdown task: `#### EXPRESSION` that reaches `task.target` using each of
    `task.numbers` at most once, with + - * / and parentheses (exact arithmetic)."""
    if text.count(ANSWER_MARK) != 1:
        return 0.0
    expression = text.split(ANSWER_MARK, 1)[1].strip().rstrip(".")
    value = evaluate_countdown(expression, task.numbers)
    if value is None:
        return 0.0
    return float(value == task.target) + format_weight


_TOKEN = re.compile(r"\s*(\d{1,6}|[-+*/()])")


def evaluate_countdown(expression: str, numbers: list[int]) -> Fraction | None:
    """The exact value of an arithmetic expression over `numbers` (each used at most once);
    None if it is not one (other symbols, a number not given, a division by zero, too long).
    A small recursive-descent parser: no eval, no ast of arbitrary Python."""
    if len(expression) > 200:
        return None
    tokens, at = [], 0
    while at < len(expression):
        match = _TOKEN.match(expression, at)
        if not match:
            if expression[at:].strip() == "":
                break
            return None
        tokens.append(match.group(1))
        at = match.end()
    parser = _Parser(tokens, list(numbers))
    try:
        value = parser.sum()
    except (ValueError, ZeroDivisionError, IndexError):
        return None
    return value if parser.at == len(tokens) else None


class _Parser:
    def __init__(self, tokens: list[str], numbers: list[int]):
        self.tokens, self.numbers, self.at = tokens, numbers, 0

    def _peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def sum(self) -> Fraction:
        value = self.product()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.at]
            self.at += 1
            right = self.product()
            value = value + right if op == "+" else value - right
        return value

    def product(self) -> Fraction:
        value = self.atom()
        while self._peek() in ("*", "/"):
            op = self.tokens[self.at]
            self.at += 1
            right = self.atom()
            value = value * right if op == "*" else value / right
        return value

    def atom(self) -> Fraction:
        token = self.tokens[self.at]
        self.at += 1
        if token == "(":
            value = self.sum()
            if self._peek() != ")":
                raise ValueError("unclosed parenthesis")
            self.at += 1
            return value
        if not token.isdigit():
            raise ValueError(f"unexpected {token!r}")
        number = int(token)
        if number not in self.numbers:
            raise ValueError(f"{number} is not one of the numbers left")
        self.numbers.remove(number)
        return Fraction(number)


def safe_reward(reward: Callable[[str, Any, float], float], text: str, task: Any, weight: float):
    """The reward, or 0 if the reward function raises on this completion (logged)."""
    try:
        return float(reward(text, task, weight))
    except Exception:  # noqa: BLE001 - one completion's problem, not the run's
        log.warning("rl: the reward function failed on a completion; reward 0", exc_info=True)
        return 0.0
