"""Read DCP's `.metadata` without running code, and refuse any entry that is not a tensor.

DCP pickles its `.metadata`, and for an entry that the metadata marks as bytes it calls
`torch.load(weights_only=False)` on the item: both run code from the file. A checkpoint comes
from elsewhere (another site, another person), so it is untrusted input:

- the pickle is read by an unpickler that resolves only the exact (module, name) pairs a DCP
  checkpoint of tensors holds, with no dotted-name lookup (`os.system` "inside" an allowed
  module is refused), and that sets state only on instances of those classes;
- the result must be DCP `Metadata` whose every entry is a tensor, whose items lie in plain
  files of the checkpoint directory and need no storage transforms; anything else is refused
  before DCP reads a byte of the items.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.serialization
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

METADATA_FILE = ".metadata"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the problem."""


_DCP = "torch.distributed.checkpoint.metadata"
# Classes whose instances the pickle may build and fill in (BUILD), and nothing else.
# BytesStorageMetadata is admitted only so that its entry can be refused by name below.
_DATA_CLASSES = {
    (_DCP, cls.__name__): cls
    for cls in (
        Metadata,
        TensorStorageMetadata,
        TensorProperties,
        ChunkStorageMetadata,
        MetadataIndex,
        StorageMeta,
        BytesStorageMetadata,
    )
}
_DATA_CLASSES["torch.distributed.checkpoint.filesystem", "_StorageInfo"] = _StorageInfo
# Everything a checkpoint of this project's tensors pickles besides them (found by listing
# the globals of real checkpoints): shapes, dtypes, layouts, memory formats, the save path.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_DATA_CLASSES,
    (_DCP, "_MEM_FORMAT_ENCODING"): _MEM_FORMAT_ENCODING,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    **{("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
}
_BUILDABLE = tuple(_DATA_CLASSES.values())


class _Refusal(Exception):
    """Raised inside the unpickler; turned into a CheckpointError naming the file."""


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be checked one by one), with an exact list
    of globals and state set only on checkpoint data classes, never on a class or module."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _Refusal(
                f"refused to load {name!r} from module {module!r} (not a checkpoint class)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refusal("refused a persistent id (DCP metadata has none)")

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(target, type):  # would rewrite a class for the whole process
            raise _Refusal(f"refused to change the class {target.__name__!r}")
        if not isinstance(target, _BUILDABLE):
            raise _Refusal(f"refused to set the state of a {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def unpickle_metadata(data: bytes, file: Path) -> Any:
    """The object pickled in `data` (the contents of `file`), through the exact allow list."""
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refusal as refusal:
        raise CheckpointError(f"{file}: {refusal}") from None
    except Exception as exc:  # a malformed pickle fails in many ways; all mean "unreadable"
        reason = " ".join(str(exc).split())[:200]  # one line, whatever the file made of it
        raise CheckpointError(
            f"{file}: unreadable DCP metadata ({type(exc).__name__}: {reason})"
        ) from None


def read_metadata(checkpoint: Path) -> Metadata:
    """The checked DCP metadata of the checkpoint directory `checkpoint`."""
    file = checkpoint / METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not a DCP checkpoint)")
    metadata = unpickle_metadata(file.read_bytes(), file)
    problem = _problem(metadata, checkpoint)
    if problem:
        raise CheckpointError(f"{file}: {problem}")
    return metadata


def _problem(metadata: Any, checkpoint: Path) -> str | None:
    """None if `metadata` describes only tensors in plain files of `checkpoint`, else why not."""
    if type(metadata) is not Metadata:
        return f"is a pickled {type(metadata).__name__!r}, not DCP Metadata"
    entries, items = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(items, dict):
        return "malformed: state_dict_metadata and storage_data must be dicts"
    for fqn, entry in entries.items():
        if not isinstance(entry, TensorStorageMetadata):
            return (
                f"refused entry {fqn!r}: stored as {type(entry).__name__}, not a tensor "
                "(DCP would unpickle it; ostinato checkpoints hold tensors only)"
            )
        if not _is_tensor_entry(entry):
            return f"malformed tensor entry {fqn!r}"
    for index, info in items.items():
        problem = _item_problem(index, info, checkpoint)
        if problem:
            return problem
    return None


def _is_tensor_entry(entry: TensorStorageMetadata) -> bool:
    props = entry.properties
    return (
        isinstance(props, TensorProperties)
        and isinstance(props.dtype, torch.dtype)
        and isinstance(entry.size, torch.Size)
        and isinstance(entry.chunks, list)
        and all(isinstance(c, ChunkStorageMetadata) for c in entry.chunks)
    )


def _item_problem(index: Any, info: Any, checkpoint: Path) -> str | None:
    if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
        return f"malformed storage entry {index!r}"
    name = info.relative_path
    if not isinstance(name, str) or not _is_plain_name(name):
        return f"refused item {index.fqn!r}: file {name!r} is not a file of the checkpoint"
    if not (checkpoint / name).is_file():
        return f"item {index.fqn!r}: its file {name} is missing"
    if info.transform_descriptors:
        return f"refused item {index.fqn!r}: storage transforms {info.transform_descriptors!r}"
    sizes = (info.offset, info.length)
    if not all(type(n) is int and n >= 0 for n in sizes):
        return f"malformed storage entry {index.fqn!r}: offset and length {sizes}"
    return None


def _is_plain_name(name: str) -> bool:
    """A file name in the directory itself: no separator, no `..`, not absolute."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
