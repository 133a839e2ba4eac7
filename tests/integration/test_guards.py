"""The non-finite and loss-spike guards: a poisoned step is skipped, a streak or a spike rolls
back (a spike also skips its data), and without the guard the same fault ruins the run."""

import json
import math
import shutil
import statistics

import pytest
import torch

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.state import parameter_digest
from ostinato.goodput import read_events
from tests.conftest import TINY, run_cli
from tests.integration.test_resume import final_state

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


# A 40-step run is mostly the loss's first descent, so the spike guard judges against the last 20
# losses rather than its default 100. Steps 30..34 read random tokens unless their data is skipped.
SPIKE = (
    "--train.steps=40",
    "--checkpoint.every=5",
    "--checkpoint.keep=10",
    "--guards.spike_window=20",
    "--guards.spike_warmup=10",
    "--faults.schedule=spike@step=30,window=5",
)


def losses_by_step(run):
    return {r["step"]: r["loss"] for r in metrics(run)}


def normal_loss(losses):
    return statistics.median(losses[s] for s in range(20, 30))


@pytest.fixture(scope="module")
def spiked(tmp_path_factory):
    out = tmp_path_factory.mktemp("spiked")
    done = run_cli("train", "--config", str(TINY), "--out", str(out), *SPIKE)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stderr


def test_a_loss_spike_rolls_back_and_skips_the_poisoned_data(spiked):
    out, stderr = spiked
    assert "guard spike: step 30 loss" in stderr
    assert "rolled back to step 25, skipping 20 steps of data" in stderr
    losses = losses_by_step(out)
    assert losses[30] > normal_loss(losses) + 2  # random tokens: about ln(512) = 6.2
    assert [r["step"] for r in metrics(out) if r["skipped"]] == [30]
    # the other four poisoned batches were skipped with the data window
    assert max(losses[s] for s in range(31, 41)) < normal_loss(losses) + 0.5
    events = read_events(out)
    assert [e["label"] for e in events if e["kind"] == "fault"] == ["spike injected"]
    assert any(e["kind"] == "detect" and "guard spike" in e["label"] for e in events)
    assert any(e["kind"] == "discarded" for e in events)


def test_without_the_spike_guard_the_poisoned_data_is_trained_on(tmp_path, spiked):
    done = run_cli(
        "train", "--config", str(TINY), "--out", str(tmp_path), *SPIKE, "--guards.spike=false"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "guard spike" not in done.stderr
    losses = losses_by_step(tmp_path)
    assert min(losses[s] for s in range(30, 35)) > normal_loss(losses) + 2
    assert not any(r["skipped"] for r in metrics(tmp_path))
    guarded = parameter_digest(load_trained(spiked[0]).model)
    assert parameter_digest(load_trained(tmp_path).model) != guarded


def test_a_run_killed_before_the_spike_resumes_bit_identical(tmp_path, spiked):
    """The spike guard's window lives in the checkpoint: without it the resumed run would have
    too few losses at step 30 to judge, and would train on the poison."""
    reference, _ = spiked
    kept = "checkpoints/step_00000025"  # all that a kill at step 26..29 leaves behind
    shutil.copytree(reference / kept, tmp_path / kept)
    done = run_cli("train", "--config", str(TINY), "--out", str(tmp_path), *SPIKE)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr and "guard spike: step 30" in done.stderr
    got, expected = final_state(tmp_path), final_state(reference)
    for part in ("model", "optimizer"):
        for name, tensor in expected[part].items():
            values = tensor.items() if isinstance(tensor, dict) else [(None, tensor)]
            for key, value in values:
                mine = got[part][name] if key is None else got[part][name][key]
                assert torch.equal(mine, value), f"{part}.{name}.{key}"
    resumed = losses_by_step(tmp_path)
    assert resumed == {s: x for s, x in losses_by_step(reference).items() if s > 25}
