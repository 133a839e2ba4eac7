import logging
import os
import pickle

import pytest
import torch

from ostinato.checkpoint.state import check_compatible, find_resume_point
from ostinato.checkpoint.store import (
    CheckpointError,
    CheckpointWriter,
    committed_checkpoints,
    latest_good,
    load_tensors,
    verify,
)
from ostinato.config import CheckpointConfig, load_config

pytestmark = pytest.mark.timeout(60)


def state(value: float) -> dict:
    return {
        "model": {"w": torch.full((4, 3), value), "b": torch.arange(5) + int(value)},
        "optimizer": {"w": {"step": torch.tensor(value), "exp_avg": torch.full((4, 3), -value)}},
    }


def empty() -> dict:
    return {
        "model": {"w": torch.zeros(4, 3), "b": torch.zeros(5, dtype=torch.int64)},
        "optimizer": {"w": {"step": torch.tensor(0.0), "exp_avg": torch.zeros(4, 3)}},
    }


def write(root, steps, keep=5, async_save=True):
    writer = CheckpointWriter(root, CheckpointConfig(keep=keep, async_save=async_save))
    for step in steps:
        writer.save(step, state(float(step)), {"note": step}, {"tokenizer.json": b"{}"})
    writer.wait()


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_and_pruning(tmp_path, async_save):
    write(tmp_path, [1, 2, 3, 4], keep=2, async_save=async_save)
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step_00000004", "step_00000003"]
    loaded = empty()
    load_tensors(latest_good(tmp_path), loaded)
    expected = state(4.0)
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert torch.equal(loaded["model"]["b"], expected["model"]["b"])
    assert torch.equal(loaded["optimizer"]["w"]["exp_avg"], expected["optimizer"]["w"]["exp_avg"])


def _data_file(checkpoint):
    return next(p for p in checkpoint.iterdir() if p.suffix == ".distcp")


def test_bit_flip_falls_back_to_previous_with_a_warning_naming_the_file(tmp_path, caplog):
    write(tmp_path, [1, 2])
    newest = committed_checkpoints(tmp_path)[0]
    data = _data_file(newest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ostinato"):
        assert latest_good(tmp_path).name == "step_00000001"
    assert str(data) in caplog.text and "checksum mismatch" in caplog.text


def test_truncated_and_unmarked_checkpoints_are_skipped(tmp_path):
    write(tmp_path, [1, 2, 3])
    newest, middle = committed_checkpoints(tmp_path)[:2]
    data = _data_file(newest)
    data.write_bytes(data.read_bytes()[:10])
    assert "truncated" in verify(newest)
    (middle / "COMMITTED").unlink()
    assert latest_good(tmp_path).name == "step_00000001"


def test_temporary_directories_of_a_crashed_save_are_ignored_then_cleaned(tmp_path):
    write(tmp_path, [1])
    torn = tmp_path / ".tmp-step_00000002"
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"half")
    assert latest_good(tmp_path).name == "step_00000001"
    CheckpointWriter(tmp_path, CheckpointConfig())
    assert not torn.exists()


def test_metadata_that_would_run_code_is_refused(tmp_path):
    write(tmp_path, [1])
    checkpoint = latest_good(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Exploit()))
    assert verify(checkpoint) is not None  # the manifest catches it first
    with pytest.raises(Exception, match="refusing to load"):  # and the reader refuses it anyway
        load_tensors(checkpoint, empty())


def test_resume_choices(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_resume_point("auto", root) is None
    write(root, [1, 2])
    assert find_resume_point("auto", root).name == "step_00000002"
    assert find_resume_point(str(tmp_path), root).name == "step_00000002"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        find_resume_point(str(tmp_path / "missing"), root)
    assert find_resume_point("none", root) is None
    assert not committed_checkpoints(root)


def test_incompatible_model_config_is_named(tmp_path):
    saved = load_config(None, ["model.size=tiny"]).to_dict()
    current = load_config(None, ["model.size=demo"]).to_dict()
    with pytest.raises(CheckpointError, match="model.dim: 64 in the checkpoint, 128 now"):
        check_compatible({"config": saved}, current, tmp_path)
    check_compatible({"config": saved}, saved, tmp_path)
