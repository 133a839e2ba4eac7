"""Two gloo ranks under torchrun: identical parameters after DDP training (parallel.strategy = ddp;
the sharded default is tests/integration/test_fsdp.py), resumable on one rank."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.state import parameter_digest
from ostinato.train.metrics import read_metrics
from tests.conftest import TINY, cli_env, run_cli

pytestmark = pytest.mark.timeout(240)
WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=200, env=cli_env()
    )


def test_two_ranks_end_identical_and_resume_on_one(tmp_path):
    out = tmp_path / "run"
    done = torchrun(
        2, str(WORKER), str(TINY), str(out), "train.steps=12", "checkpoint.every=4", "parallel.strategy=ddp"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["step"] == 12
    # What was saved is what the ranks hold.
    assert parameter_digest(load_trained(out).model) == ranks[0]["digest"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[0]["tokens"] == 2 * 4 * 32  # both ranks' batch_size * seq_len, per step

    # Saved on 2 ranks, resumed on 1: training goes on from the saved step and data position.
    resumed = run_cli("train", "--config", str(TINY), "--out", str(out), "--train.steps=16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 17))
    meta = json.loads((load_trained(out).path / "meta.json").read_text())
    assert meta["data"]["consumed"] == 12 * 2 * 4 + 4 * 4  # sequences: 2 ranks, then 1, of 4


def test_torchrun_cli_launch(tmp_path):
    out = tmp_path / "run"
    done = torchrun(
        2, "-m", "ostinato", "train", "--config", str(TINY), "--out", str(out), "--train.steps=4"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final loss" in done.stdout
    assert (out / "checkpoints").is_dir() and (out / "tokenizer.json").is_file()
