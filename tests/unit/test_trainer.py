"""The island trainer in one process: accumulation, precision choice, metrics."""

import pytest
import torch

from ostinato.checkpoint.reader import load_trained
from ostinato.hardware import Placement
from ostinato.train.metrics import read_metrics
from ostinato.train.trainer import autocast_dtype, train
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(120)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    common = ["train.steps=3", "checkpoint.every=0", "train.eval_problems=0", "train.samples=0"]
    big = tiny_config(*common, "train.batch_size=4", "train.grad_accum=1")
    split = tiny_config(*common, "train.batch_size=2", "train.grad_accum=2")
    train(big, tmp_path / "big", "none", show_progress=False)
    train(split, tmp_path / "split", "none", show_progress=False)
    a, b = load_trained(tmp_path / "big").model, load_trained(tmp_path / "split").model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=name)
    losses = [r["loss"] for r in read_metrics(tmp_path / "big" / "metrics.jsonl")]
    split_losses = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert losses == pytest.approx(split_losses, rel=1e-5)


def test_bf16_autocast_on_accelerators_fp32_on_cpu():
    cfg = tiny_config().train
    cpu = Placement(torch.device("cpu"), "gloo")
    gpu = Placement(torch.device("cuda", 0), "nccl")
    # (torch knows the "npu" device type only once torch_npu is imported; cuda stands for both)
    assert autocast_dtype(cfg, cpu) is None
    assert autocast_dtype(cfg, gpu) is torch.bfloat16
    forced = tiny_config("train.dtype=bf16").train
    assert autocast_dtype(forced, cpu) is torch.bfloat16


def test_metrics_have_the_contract_keys_at_full_precision(tmp_path):
    result = train(tiny_config("train.steps=4"), tmp_path / "run", "none", show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "compute_s", "checkpoint_stall_s"):
        assert all(isinstance(r[key], float) for r in records), key
    assert records[-1]["loss"] == result.final_loss  # written with every bit
    assert (tmp_path / "run" / "config.toml").is_file()
    assert (tmp_path / "run" / "tokenizer.json").is_file()
