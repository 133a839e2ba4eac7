"""`ostinato rl` as a user runs it: GRPO on a model `ostinato train` made, its outputs, a trainer
killed with SIGKILL and resumed (bit-identical on CPU), and recipes it refuses by field."""

import importlib.util
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.state import init_optimizer_state, tensor_state
from ostinato.checkpoint.store import committed_checkpoints, load_tensors, verify
from ostinato.jsonl import read_jsonl
from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.timeout(300)


def recipe(tmp: Path, init_run: Path, **rl) -> Path:
    values = dict(
        init=str(init_run), steps=4, prompts=2, group_size=4, max_new_tokens=40, lr=1e-3,
        eval_every=2, eval_problems=4, checkpoint_every=1, threads=1,
    )  # fmt: skip
    values |= rl
    lines = ["[rl]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
    path = tmp / "rl.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rl_command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ostinato", "rl", "--config", str(config), "--out", str(out)]


def final_state(run: Path) -> dict:
    trained = load_trained(run)
    optimizer = torch.optim.AdamW(trained.model.parameters())
    init_optimizer_state(trained.model, optimizer)
    state = tensor_state(trained.model, optimizer)
    load_tensors(committed_checkpoints(run / "checkpoints")[0], state)
    return state


@pytest.fixture(scope="module")
def reference(sft_run, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rl")
    out = tmp / "out"
    done = subprocess.run(
        rl_command(recipe(tmp, sft_run), out), capture_output=True, text=True, env=cli_env(),
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_run_writes_what_the_contract_names(reference, sft_run):
    summary = json.loads((reference / "summary.json").read_text())
    assert 0.0 <= summary["initial_accuracy"] <= 1.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    records = read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in ("reward", "staleness", "rollout_tokens_per_s", "kl", "clip_fraction"):
            assert key in record, key
        assert record["staleness"] == {"0": 8}  # lock-step: every rollout from this policy
    assert [("accuracy" in r) for r in records] == [False, True, False, True]
    assert (reference / "curve.png").stat().st_size > 0
    # the updates moved the policy, and the result loads as a model (export, serve, chat)
    before, after = load_trained(sft_run).model.state_dict(), load_trained(reference).model
    assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items())
    assert any(r["grad_norm"] > 0 for r in records)


def test_killed_and_resumed_ends_bit_identical(reference, sft_run, tmp_path):
    out = tmp_path / "out"
    config = recipe(tmp_path, sft_run)
    process = subprocess.Popen(
        rl_command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env()
    )
    # killed at once after a random update's checkpoint, mid-way into the next update
    kill_after = random.Random().randint(1, 3)  # in the message of any failure: reproducible
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and process.poll() is None:
        # a checkpoint whose files and marker are complete (its marker may exist a moment
        # before it holds the checksum: a kill then falls back to the previous checkpoint)
        done = committed_checkpoints(out / "checkpoints")
        if len(done) >= kill_after and verify(done[0]) is None:
            break
        time.sleep(0.002)
    assert process.poll() is None, f"the run ended before update {kill_after}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    done = subprocess.run(
        rl_command(config, out), capture_output=True, text=True, env=cli_env(), timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr, f"killed after update {kill_after}: no resume"
    got, expected = final_state(out), final_state(reference)
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), f"model.{name} (killed at {kill_after})"
    for name, moments in expected["optimizer"].items():
        for key, value in moments.items():
            assert torch.equal(got["optimizer"][name][key], value), f"optimizer.{name}.{key}"
    rewards = [r["reward"] for r in read_jsonl(out / "metrics.jsonl")]
    assert rewards == [r["reward"] for r in read_jsonl(reference / "metrics.jsonl")]


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"init": ""}, "rl.init is empty"),
        ({"init": "/nonexistent/run"}, "rl.init"),
        ({"max_staleness": 2}, "rl.max_staleness = 2"),  # only islands generate ahead
        ({"task": "poetry"}, "rl.task"),
        ({"group_size": 1}, "rl.group_size"),
        ({"engine": "vllm"}, "rl.engine = 'vllm': vLLM generates on rollout islands"),
        ({"engine": "gpt"}, "rl.engine"),
    ],
)
def test_a_bad_recipe_is_refused_by_field(sft_run, tmp_path, extra, named):
    done = run_cli(
        "rl", "--config", str(recipe(tmp_path, sft_run, **extra)), "--out", str(tmp_path / "o")
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert named in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_the_vllm_engine_without_vllm_is_refused_before_anything_starts(sft_run, tmp_path):
    config = recipe(tmp_path, sft_run, engine="vllm", rollout_islands=1)
    done = run_cli("rl", "--config", str(config), "--out", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "rl.engine = 'vllm': vLLM is not installed" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o" / "metrics.jsonl").exists()


def test_a_fault_an_rl_run_cannot_strike_is_refused(sft_run, tmp_path):
    done = run_recipe(tmp_path, sft_run, "nan@step=2", rollout_islands=1)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "faults.schedule: nan@" in done.stderr and "crash and hang" in done.stderr


def test_a_model_section_unlike_the_init_run_is_refused(sft_run, tmp_path):
    config = recipe(tmp_path, sft_run)
    config.write_text('[model]\nsize = "demo"\n\n' + config.read_text())
    done = run_cli("rl", "--config", str(config), "--out", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.size" in done.stderr and "rl.init" in done.stderr


def run_recipe(
    tmp_path: Path, sft_run: Path, faults: str = "", **rl
) -> subprocess.CompletedProcess:
    config = recipe(tmp_path, sft_run, **rl)
    if faults:
        config.write_text(config.read_text() + f'\n[faults]\nschedule = "{faults}"\n')
    return subprocess.run(
        rl_command(config, tmp_path / "out"), capture_output=True, text=True, env=cli_env(),
        timeout=240,
    )  # fmt: skip
