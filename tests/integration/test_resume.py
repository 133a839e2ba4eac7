"""The CLI killed with SIGKILL (at a random step, and in the middle of a checkpoint write),
resumed with --resume auto, ends bit-identical to an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ostinato.checkpoint.reader import resolve_checkpoint
from ostinato.checkpoint.state import init_optimizer_state, tensor_state
from ostinato.checkpoint.store import committed_checkpoints, load_tensors
from ostinato.config import load_config
from ostinato.model.llama import Llama
from ostinato.train.metrics import read_metrics
from ostinato.train.state import make_optimizer
from tests.conftest import TINY, cli_env, run_cli

pytestmark = pytest.mark.timeout(300)
STEPS = ("--train.steps=30", "--checkpoint.every=3", "--checkpoint.keep=2")


def train_args(out: Path) -> list[str]:
    return ["train", "--config", str(TINY), "--out", str(out), *STEPS]


def start(out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "ostinato", *train_args(out)]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env()
    )


def final_state(run: Path) -> dict:
    """Model and optimizer tensors of the run's newest checkpoint."""
    cfg = load_config(run / "config.toml")
    model = Llama(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    init_optimizer_state(model, optimizer)
    state = tensor_state(model, optimizer)
    load_tensors(resolve_checkpoint(run), state)
    return state


def assert_identical(run: Path, reference: Path) -> None:
    got, expected = final_state(run), final_state(reference)
    for part in ("model", "optimizer"):
        for name, tensor in expected[part].items():
            if isinstance(tensor, dict):
                for key, value in tensor.items():
                    assert torch.equal(got[part][name][key], value), f"{part}.{name}.{key}"
            else:
                assert torch.equal(got[part][name], tensor), f"{part}.{name}"
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses == [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    done = run_cli(*train_args(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def wait_for_step(out: Path, process: subprocess.Popen, step: int) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= step:
            return
        time.sleep(0.002)
    raise AssertionError(f"training never reached step {step}")


def test_kill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference):
    kill_at = random.Random().randint(2, 27)
    out = tmp_path / "run"
    process = start(out)
    wait_for_step(out, process, kill_at)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = run_cli(*train_args(out))
    assert done.returncode == 0, f"killed at step {kill_at}: {done.stderr[-3000:]}"
    assert "from the corpus cache" in done.stderr  # the restart did not tokenize again
    assert_identical(out, reference)


def kill_during_a_save(out: Path) -> bool:
    """Start training and SIGKILL it while a checkpoint is being written; True if it was."""
    process = start(out)
    checkpoints = out / "checkpoints"
    while process.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
    return False


def test_kill_in_the_middle_of_a_checkpoint_write(tmp_path, reference):
    out = tmp_path / "run"
    torn = any(kill_during_a_save(out) for _ in range(3))
    assert torn, "never caught a save in progress"
    for checkpoint in committed_checkpoints(out / "checkpoints"):
        assert resolve_checkpoint(checkpoint) == checkpoint  # every committed one verifies
    done = run_cli(*train_args(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_identical(out, reference)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    out = tmp_path / "run"
    first = run_cli(
        *train_args(out)[:-3], "--train.steps=30", "--checkpoint.every=3", "--checkpoint.keep=3"
    )
    assert first.returncode == 0
    newest = committed_checkpoints(out / "checkpoints")[0]
    data = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # one flipped bit
    data.write_bytes(bytes(raw))
    again = run_cli(*train_args(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert str(data.name) in again.stderr and "checksum mismatch" in again.stderr
    assert "resumed from" in again.stderr and "step_00000027" in again.stderr
    assert_identical(out, reference)
