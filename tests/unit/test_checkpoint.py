import dataclasses
import io
import logging
import pickle
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from ostinato.checkpoint.dcp_metadata import ALLOWED_GLOBALS, read_metadata
from ostinato.checkpoint.state import check_compatible, find_resume_point
from ostinato.checkpoint.store import (
    CheckpointError,
    CheckpointWriter,
    SafeReader,
    committed_checkpoints,
    latest_good,
    load_tensors,
    verify,
)
from ostinato.config import CheckpointConfig, load_config
from tests import hostile

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


def test_metadata_that_would_run_code_is_refused_even_when_its_checksums_match(tmp_path):
    write(tmp_path / "checkpoints", [1, 2])
    previous, newest = committed_checkpoints(tmp_path / "checkpoints")[::-1]
    marker = tmp_path / "marker"
    hostile.plant_stack_global(newest, marker)
    assert hostile.is_live(newest, marker, "model.w", tmp_path)  # a plain reader runs it
    refused = f"{newest / '.metadata'}: refused to load 'os.system' from module"
    assert verify(newest).startswith(refused)
    with pytest.raises(CheckpointError, match="refused to load 'os.system'"):
        load_tensors(newest, empty())  # the fleet checkpoint's path: no verify before it
    with pytest.raises(CheckpointError, match="refused to load 'os.system'"):
        find_resume_point(str(newest), tmp_path / "checkpoints")
    assert find_resume_point("auto", tmp_path / "checkpoints") == previous  # as if corrupted
    assert not marker.exists()


def test_an_entry_marked_as_bytes_is_refused_before_dcp_reads_it(tmp_path, caplog):
    write(tmp_path, [1, 2])
    previous, newest = committed_checkpoints(tmp_path)[::-1]
    marker = tmp_path / "marker"
    fqn = hostile.plant_bytes_entry(newest, marker)
    assert hostile.is_live(newest, marker, fqn, tmp_path)  # DCP would torch.load it unsafely
    problem = f"{newest / '.metadata'}: refused entry {fqn!r}: stored as BytesStorageMetadata"
    assert verify(newest).startswith(problem)
    with pytest.raises(CheckpointError, match="refused entry"):
        load_tensors(newest, empty())
    with caplog.at_level(logging.WARNING, logger="ostinato"):
        assert latest_good(tmp_path) == previous
    assert "refused entry" in caplog.text
    assert not marker.exists()


def test_the_reader_itself_refuses_an_item_dcp_would_unpickle(tmp_path):
    """The last door: even handed unchecked metadata, SafeReader reads no bytes entry."""
    write(tmp_path, [1])
    checkpoint, marker = latest_good(tmp_path), tmp_path / "marker"
    fqn = hostile.plant_bytes_entry(checkpoint, marker)
    unchecked = pickle.loads((checkpoint / ".metadata").read_bytes())  # our own, benign pickle
    with pytest.raises(CheckpointException, match="refused non-tensor entries"):
        dcp.load(
            {fqn: torch.zeros(1)}, storage_reader=SafeReader(checkpoint, unchecked), no_dist=True
        )
    assert not marker.exists()


def _stack_global(module: str, name: str) -> bytes:
    return b"\x80\x04" + hostile.pickle_string(module) + hostile.pickle_string(name) + b"\x93"


@pytest.mark.parametrize(
    "pickled, refused",
    [
        # BUILD on the class Metadata itself: would rewrite it for the whole process.
        (
            _stack_global("torch.distributed.checkpoint.metadata", "Metadata")
            + b"}"
            + hostile.pickle_string("x")
            + b"K\x01sb.",
            "refused to change the class 'Metadata'",
        ),
        # A dotted name that resolves to an allowed object is refused all the same.
        (_stack_global("torch", "Size.__class__") + b".", "'Size.__class__' from module 'torch'"),
        (b"\x80\x02ctorch\nload\n.", "'load' from module 'torch'"),
        (b"\x80\x04K\x01.", "is a pickled 'int', not DCP Metadata"),
        (b"\x80\x04\x8c\x03abc", "unreadable DCP metadata"),
    ],
)
def test_the_metadata_unpickler_admits_exact_names_only(tmp_path, pickled, refused):
    write(tmp_path, [1])
    checkpoint = latest_good(tmp_path)
    (checkpoint / ".metadata").write_bytes(pickled)
    with pytest.raises(CheckpointError, match=re.escape(refused)):
        read_metadata(checkpoint)


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/hostname", "sub/x.distcp", ".."])
def test_items_outside_the_checkpoint_directory_are_refused(tmp_path, name):
    write(tmp_path, [1])
    checkpoint = latest_good(tmp_path)
    metadata = read_metadata(checkpoint)
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = dataclasses.replace(info, relative_path=name)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="is not a file of the checkpoint"):
        read_metadata(checkpoint)


def test_the_allow_list_is_what_real_checkpoints_need(tmp_path):
    """Every global a checkpoint of model, AdamW state and mixed dtypes pickles is admitted,
    and nothing else: so the list is exact, not a prefix."""
    write(tmp_path, [1])
    used = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            used.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO((latest_good(tmp_path) / ".metadata").read_bytes())).load()
    assert used <= set(ALLOWED_GLOBALS)
    assert not any("." in name for _, name in ALLOWED_GLOBALS)
    assert {module for module, _ in ALLOWED_GLOBALS} == {
        "torch",
        "torch.serialization",
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "pathlib",
    }


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
