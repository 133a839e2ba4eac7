"""Hostile checkpoints for tests: a real checkpoint, rewritten so that only the loader stands
between its pickles and a shell command (the manifest and COMMITTED marker are recomputed).

Each payload runs `touch MARKER`: the marker's absence proves that nothing ran, and `is_live`
proves the payload would have run under a plain reader (so an absent marker means something).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shlex
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from ostinato.checkpoint.dcp_metadata import read_metadata

EVIL_ITEM = "__evil.distcp"


def pickle_string(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def stack_global_os_system(command: str) -> bytes:
    """Protocol 4: STACK_GLOBAL ('torch.distributed.checkpoint.filesystem', 'os.system'), a
    dotted name inside an allowed module, called with `command`."""
    return (
        b"\x80\x04"
        + pickle_string("torch.distributed.checkpoint.filesystem")
        + pickle_string("os.system")
        + b"\x93"  # STACK_GLOBAL
        + pickle_string(command)
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


def global_os_system(command: str) -> bytes:
    """Protocol 2: GLOBAL os.system called with `command` (what torch.load would unpickle)."""
    return b"\x80\x02cos\nsystem\n" + pickle_string(command) + b"\x85R."


def touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def recommit(checkpoint: Path) -> None:
    """Rewrite manifest.json (every file's size and sha256) and COMMITTED to match the files."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and p.name not in ("manifest.json", "COMMITTED")
    }
    manifest = checkpoint / "manifest.json"
    manifest.write_text(json.dumps({"files": files}, indent=1))
    (checkpoint / "COMMITTED").write_text(hashlib.sha256(manifest.read_bytes()).hexdigest())


def plant_stack_global(checkpoint: Path, marker: Path) -> None:
    """(a) `.metadata` is a four-opcode pickle running `touch MARKER` through os.system."""
    (checkpoint / ".metadata").write_bytes(stack_global_os_system(touch(marker)))
    recommit(checkpoint)


def plant_bytes_entry(checkpoint: Path, marker: Path, prefix: str = "model.") -> str:
    """(b) The metadata marks the first entry under `prefix` as bytes; its item is a pickle
    running `touch MARKER`, which DCP would read with torch.load(weights_only=False).
    Returns the entry's name."""
    metadata = read_metadata(checkpoint)
    fqn = next(k for k in metadata.state_dict_metadata if k.startswith(prefix))
    payload = global_os_system(touch(marker))
    metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != fqn}
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo(EVIL_ITEM, 0, len(payload))
    (checkpoint / EVIL_ITEM).write_bytes(payload)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    recommit(checkpoint)
    return fqn


def is_live(checkpoint: Path, marker: Path, fqn: str, work: Path) -> bool:
    """True if a plain DCP reader of a copy of `checkpoint` runs the payload (then the marker
    is removed again). `fqn` is an entry to load into."""
    copy = work / "plain-reader-copy"
    shutil.copytree(checkpoint, copy)
    state = {fqn: torch.zeros(1)}
    try:
        dcp.load(state, storage_reader=FileSystemReader(copy), no_dist=True)
    except (Exception, CheckpointException):  # the payload runs first; what follows is moot
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    shutil.rmtree(copy)
    return ran
