"""loss.png: the learning curve read from a run's or a fleet's own logs."""

import json

import pytest

from ostinato.curves import EVAL_FILE, curves, draw_loss, running_mean, token_of_time

pytestmark = pytest.mark.timeout(60)

T = 1_700_000_000.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def island(folder, steps, loss0, evals=(), faults=()):
    """An island that logs `steps` steps of 100 tokens, one a second from T + 1."""
    rows = [
        {"step": s, "loss": loss0 / s, "tokens": 100, "time": T + s} for s in range(1, steps + 1)
    ]
    write_lines(folder / "metrics.jsonl", rows)
    write_lines(folder / EVAL_FILE, list(evals))
    marks = [
        {"type": "mark", "kind": "fault", "label": label, "time": T + t} for t, label in faults
    ]
    spans = [{"type": "span", "kind": "compute", "start": T, "end": T + steps}]
    write_lines(folder / "events.jsonl", spans + marks)


def test_a_fleet_has_one_curve_per_island_with_its_faults_at_their_tokens(tmp_path):
    island(tmp_path / "a", 10, 8.0, evals=[{"step": 5, "tokens": 500, "val_loss": 2.0}])
    # b crashed 4.5 s in: after its 4th step, at 400 tokens
    island(tmp_path / "b", 6, 9.0, faults=[(4.5, "crash injected")])
    found = curves(tmp_path)
    assert sorted(found) == ["a", "b"]
    assert found["a"]["tokens"] == [100 * s for s in range(1, 11)]
    assert found["a"]["loss"][1] == 4.0
    assert found["a"]["evals"][0]["val_loss"] == 2.0
    assert found["b"]["faults"] == [(400, "crash injected")]
    assert found["a"]["faults"] == []


def test_a_lone_run_is_its_own_island(tmp_path):
    island(tmp_path / "run", 3, 1.0)
    assert list(curves(tmp_path / "run")) == ["run"]


def test_a_fault_before_the_first_step_is_at_zero_tokens_and_untimed_steps_place_none():
    steps = [{"tokens": 10, "time": T + 1}, {"tokens": 10, "time": T + 2}]
    assert token_of_time(steps, [10, 20], T) == 0
    assert token_of_time(steps, [10, 20], T + 2.5) == 20
    assert token_of_time([{"tokens": 10}], [10], T) is None


def test_running_mean_starts_at_the_first_value_and_follows():
    assert running_mean([]) == []
    smoothed = running_mean([1.0, 0.0, 0.0])
    assert smoothed[0] == 1.0 and smoothed[1] == pytest.approx(0.9)
    assert smoothed[2] == pytest.approx(0.81)


def test_draw_loss_writes_a_png_with_an_accuracy_panel_when_measured(tmp_path):
    evals = [{"step": 5, "tokens": 500, "val_loss": 2.0, "accuracy": 0.25}]
    island(tmp_path / "a", 10, 8.0, evals=evals, faults=[(3.2, "bitflip")])
    assert draw_loss(tmp_path, tmp_path / "loss.png", "a fleet") is True
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    # two panels (loss, accuracy) make a taller figure than one: 6.5 x 110 dpi against 4.5
    height = int.from_bytes(png[20:24], "big")
    assert height == round(6.5 * 110)


def test_nothing_to_draw_draws_nothing(tmp_path):
    assert draw_loss(tmp_path, tmp_path / "loss.png", "empty") is False
    assert not (tmp_path / "loss.png").exists()
    write_lines(tmp_path / "a" / "metrics.jsonl", [])
    assert draw_loss(tmp_path, tmp_path / "loss.png", "empty") is False
