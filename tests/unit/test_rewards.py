"""Rule rewards on well-formed, malformed and adversarial answers."""

import itertools
import logging

import pytest

from ostinato.rl.rewards import (
    answer_reward,
    countdown_reward,
    evaluate_countdown,
    final_answer,
    safe_reward,
)
from ostinato.rl.tasks import Countdown, make_countdown

pytestmark = pytest.mark.timeout(60)


class Task:
    answer = 12


@pytest.mark.parametrize(
    "text, value",
    [
        ("2 + 1 = 3, write 3. So 9 + 3 = 12. #### 12", 12),
        ("#### 12", 12),
        ("####12", 12),
        ("#### -7", -7),
        ("#### 12.", 12),
        ("#### 12\n", 12),
        ("#### 12 #### 13", None),  # hedging: two answers
        ("#### 13 #### 12", None),
        ("####", None),
        ("#### ", None),
        ("#### twelve", None),
        ("#### 12 because", None),  # nothing may follow the answer
        ("#### 1" + "0" * 18, None),  # 19 digits: no answer of these tasks is that long
        ("#### " + "9" * 5000, None),  # int() of it would raise in Python >= 3.11
        ("12", None),
        ("", None),
    ],
)
def test_the_answer_is_the_one_integer_after_the_one_mark(text, value):
    assert final_answer(text) == value


def test_answer_reward_pays_the_format_and_the_answer():
    assert answer_reward("So ... #### 12", Task, 0.1) == pytest.approx(1.1)
    assert answer_reward("So ... #### 11", Task, 0.1) == pytest.approx(0.1)
    assert answer_reward("So ... 12", Task, 0.1) == 0.0
    assert answer_reward("#### 12 #### 12", Task, 0.1) == 0.0


@pytest.mark.parametrize(
    "expression, value",
    [
        ("(3 + 5) * 2", 16),
        ("3+5*2", 13),
        ("10 / (3 + 5)", 1.25),
        ("3 + 3", None),  # 3 is given once
        ("4 + 5", None),  # 4 is not given
        ("10 / (5 - 3 - 2)", None),  # a division by zero
        ("(3 + 5", None),
        ("3 + ", None),
        ("__import__('os').system('true')", None),
        ("2 ** 3", None),
        ("(" * 300 + "3" + ")" * 300, None),
        ("", None),
    ],
)
def test_countdown_expressions_are_parsed_not_evaluated(expression, value):
    got = evaluate_countdown(expression, [3, 5, 2, 10])
    assert (None if got is None else float(got)) == value


def test_countdown_reward():
    task = Countdown((3, 5, 2), 16)
    assert countdown_reward("#### (3 + 5) * 2", task, 0.1) == pytest.approx(1.1)
    assert countdown_reward("#### 3 + 5 + 2", task, 0.1) == pytest.approx(0.1)
    assert countdown_reward("#### 16", task, 0.1) == 0.0  # 16 is not one of the numbers
    assert countdown_reward("(3 + 5) * 2", task, 0.1) == 0.0


def solvable(task: Countdown) -> bool:
    """Whether some left-to-right expression over some order of the numbers reaches the target
    (how make_countdown builds them); brute force, with the module's own evaluator."""
    for order in itertools.permutations(task.numbers):
        for ops in itertools.product("+-*", repeat=len(order) - 1):
            text = str(order[0])
            for op, number in zip(ops, order[1:], strict=True):
                text = f"({text} {op} {number})"
            if evaluate_countdown(text, list(task.numbers)) == task.target:
                return True
    return False


def test_every_countdown_task_has_an_answer():
    assert all(solvable(make_countdown(0, "train", i)) for i in range(40))


def test_a_reward_function_that_raises_gives_zero_and_is_logged(caplog):
    def broken(text, task, weight):
        raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="ostinato"):
        assert safe_reward(broken, "#### 12", Task, 0.1) == 0.0
    assert "reward function failed" in caplog.text
