"""The island trainer in one process: accumulation, precision choice, metrics."""

import pytest
import torch

from ostinato.checkpoint.reader import load_trained
from ostinato.curves import EVAL_FILE
from ostinato.errors import BadInput
from ostinato.hardware import Placement
from ostinato.train import trainer
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


def test_evaluations_during_training_make_the_learning_curve(tmp_path):
    """train.eval_every: an evaluation every 3 steps but the last (the end's follows it), each
    an `evaluate` span; loss.png is drawn beside timeline.png from metrics and eval.jsonl."""
    cfg = tiny_config(
        "train.steps=7",
        "train.eval_every=3",
        "train.eval_every_problems=2",
        "train.eval_problems=3",
        "data.source=reasoning",
    )
    run = tmp_path / "run"
    result = train(cfg, run, "none", show_progress=False)
    evals = read_metrics(run / EVAL_FILE)
    per_step = cfg.train.batch_size * cfg.data.seq_len
    assert [(e["step"], e["tokens"]) for e in evals] == [
        (3, 3 * per_step),
        (6, 6 * per_step),
        (7, 7 * per_step),
    ]
    assert all(isinstance(e["val_loss"], float) for e in evals)
    # shares of 2, 2 and 3 problems answered
    assert [
        e["accuracy"] in ({0, 0.5, 1} if n == 2 else {0, 1 / 3, 2 / 3, 1})
        for e, n in zip(evals, (2, 2, 3), strict=True)
    ] == [True] * 3
    assert evals[-1]["val_loss"] == result.evaluation.val_loss
    spans = [e for e in read_metrics(run / "events.jsonl") if e.get("kind") == "evaluate"]
    assert len(spans) == 2
    assert all(isinstance(r["time"], float) for r in read_metrics(run / "metrics.jsonl"))
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert result.goodput.seconds["evaluate"] > 0


def test_tensorboard_is_asked_for_and_its_absence_is_named(tmp_path, monkeypatch):
    import builtins

    cfg = tiny_config("train.steps=2", "train.tensorboard=true", "train.eval_problems=0")
    train(cfg, tmp_path / "on", "none", show_progress=False)
    assert list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))

    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(ValueError, match=r"pip install 'ostinato\[tensorboard\]'"):
        train(cfg, tmp_path / "run", "none", show_progress=False)
    train(
        tiny_config("train.steps=1", "train.eval_problems=0"),
        tmp_path / "off",
        "none",
        show_progress=False,
    )
    assert not (tmp_path / "off" / "tensorboard").exists()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB"),  # torch_npu's kind
    ],
)
def test_running_out_of_memory_names_the_fixes(tmp_path, monkeypatch, error):
    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "_train", exhausted)
    with pytest.raises(BadInput) as refused:
        train(tiny_config(), tmp_path / "run", show_progress=False)
    message = str(refused.value)
    assert "ran out of cpu memory (single on 1 rank(s))" in message
    for fix in ("parallel.strategy = fsdp", "activation_checkpointing = full", "batch_size (now 4"):
        assert fix in message


def test_another_runtime_error_is_not_taken_for_memory(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer, "_train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train(tiny_config(), tmp_path / "run", show_progress=False)
