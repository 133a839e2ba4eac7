"""The non-finite guard: a poisoned step is skipped, a streak rolls back, and without the guard
the same fault ruins the run."""

import json
import math

import pytest

from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.timeout(120)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path):
    done = run_cli(
        "train", "--config", str(TINY), "--out", str(tmp_path), "--faults.schedule=nan@step=7"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "guard nonfinite: step 7" in done.stderr
    records = metrics(tmp_path)
    assert [r["step"] for r in records if r["skipped"]] == [7]
    assert math.isfinite(records[-1]["loss"])


def test_a_streak_of_nans_rolls_back_to_the_last_checkpoint(tmp_path):
    schedule = "--faults.schedule=nan@step=12; nan@step=13; nan@step=14"
    done = run_cli("train", "--config", str(TINY), "--out", str(tmp_path), schedule)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rolled back to step 10" in done.stderr
    assert math.isfinite(metrics(tmp_path)[-1]["loss"])


def test_without_the_guard_the_same_fault_poisons_the_model(tmp_path):
    done = run_cli(
        "train",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path),
        "--faults.schedule=nan@step=7",
        "--guards.nonfinite=false",
    )
    assert done.returncode == 0
    assert math.isnan(metrics(tmp_path)[-1]["loss"])


def test_faults_the_trainer_cannot_inject_are_refused_before_training(tmp_path):
    done = run_cli(
        "train",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path),
        "--faults.schedule=crash@island=a,step=3",
    )
    assert done.returncode == 2 and "crash" in done.stderr and "Traceback" not in done.stderr
    done = run_cli(
        "train", "--config", str(TINY), "--out", str(tmp_path), "--faults.schedule=nan@step=999"
    )
    assert done.returncode == 2 and "step" in done.stderr
