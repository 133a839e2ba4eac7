"""Atomic, checksummed checkpoints on top of torch.distributed.checkpoint (DCP).

A checkpoint is a directory `step_XXXXXXXX/` with DCP's tensor files, `meta.json` (format
version, resolved config, data position, RNG state, software stack) and `manifest.json`
(size and sha256 of every file). It is written under a temporary name, checksummed, renamed,
and only then marked with `COMMITTED`, which holds the manifest's own sha256. A `kill -9` at any
instant leaves either a committed checkpoint or a temporary directory that is ignored.

Only tensors go through DCP; everything else is JSON. DCP pickles its `.metadata` file, so it is
read by `dcp_metadata`, which runs no code and refuses any entry that is not a tensor: a
checkpoint that fails that check is treated like a corrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner

from ostinato.checkpoint.dcp_metadata import CheckpointError, read_metadata
from ostinato.config import CheckpointConfig

log = logging.getLogger("ostinato")
# One process without a process group is the normal case of a one-rank island, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")
FORMAT_VERSION = 1
MARKER, MANIFEST, META = "COMMITTED", "manifest.json", "meta.json"
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def committed_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root` that carry a marker, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else a sentence naming the file that is not."""
    marker, manifest = path / MARKER, path / MANIFEST
    if not marker.is_file() or not manifest.is_file():
        return f"{path}: not committed (no {MARKER} marker or {MANIFEST})"
    if marker.read_text().strip() != _sha256(manifest):
        return f"{manifest}: checksum does not match the {MARKER} marker"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{manifest}: unreadable"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{file}: truncated ({file.stat().st_size} of {expected['bytes']} bytes)"
        if _sha256(file) != expected["sha256"]:
            return f"{file}: checksum mismatch (corrupted)"
    try:  # checksums match, but whoever wrote them may be hostile
        read_metadata(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def latest_good(root: Path) -> Path | None:
    """The newest checkpoint that verifies; each one skipped gets a warning naming the file."""
    for path in committed_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint: %s; trying the previous one", problem)
    return None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / META}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META}: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / META}: format version {meta.get('format_version')}, this ostinato reads "
            f"{FORMAT_VERSION}. Resume with the ostinato version that wrote it, or --resume none."
        )
    return meta


class SafeReader(FileSystemReader):
    """DCP's file reader, handed metadata already read and checked (`dcp_metadata`), and
    refusing any item that DCP would unpickle (bytes) rather than load as a tensor."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        unpickled = [i.dest_index.fqn for i in plan.items if i.type != LoadItemType.TENSOR]
        if unpickled:  # `read_metadata` refuses these first; this is the last door before them
            raise CheckpointError(f"{self.path}: refused non-tensor entries {unpickled[:3]}")
        return super().read_data(plan, planner)


def load_tensors(
    path: Path, tensors: dict[str, Any], process_group=None, no_dist: bool = False
) -> None:
    """Fill `tensors` (a nested dict of tensors) in place from the checkpoint at `path`;
    `no_dist`: this process reads alone, with no collectives (the other ranks may be busy)."""
    metadata = read_metadata(path)  # refuses a hostile checkpoint before DCP reads anything
    try:
        dcp.load(
            tensors,
            storage_reader=SafeReader(path, metadata),
            process_group=process_group,
            no_dist=no_dist,
        )
    except CheckpointException as exc:
        reasons = "; ".join(str(getattr(f, "exc", f)) for f in exc.failures.values())
        raise CheckpointError(f"checkpoint {path} cannot be read: {reasons}") from None


def stage(tensors: dict[str, Any]) -> dict[str, Any]:
    """A detached CPU copy, so training can go on while the copy is written."""
    if isinstance(tensors, dict):
        return {k: stage(v) for k, v in tensors.items()}
    return tensors.detach().to("cpu", copy=True)


class CheckpointWriter:
    """Writes checkpoints of one island, in the background when `cfg.async_save` is set.

    Every rank calls `save`; DCP writes each rank's share, and rank 0 then checksums, renames
    and marks the directory. Writes go through a process group of their own so a background
    save never interleaves with the training collectives.
    """

    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        rank: int = 0,
        process_group=None,
        sync_ranks: bool = True,
    ):
        self.root, self.cfg, self.rank, self.group = root, cfg, rank, process_group
        self.no_dist = not sync_ranks  # a writer of one rank only: no collectives
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_saved_step: int | None = None
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(TMP_PREFIX + "*"):  # left by a crash during a save
                shutil.rmtree(stale, ignore_errors=True)
        if sync_ranks and dist.is_initialized():
            dist.barrier()

    def save(
        self,
        step: int,
        tensors: dict[str, Any],
        meta: dict[str, Any],
        files: dict[str, bytes] | None = None,
    ) -> float:
        """Start saving tensors, JSON `meta` and small `files` (e.g. tokenizer.json) at `step`.

        Returns the seconds training was stalled by it.
        """
        started = time.perf_counter()
        self.wait()
        staged = stage(tensors)
        meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
        args = (step, staged, meta, files or {})
        if self.cfg.async_save:
            self._thread = threading.Thread(target=self._write_guarded, args=args)
            self._thread.start()
        else:
            self._write(*args)
        self.last_saved_step = step
        return time.perf_counter() - started

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_guarded(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as exc:  # surfaced to the training thread by wait()
            self._error = exc

    def _write(
        self, step: int, staged: dict[str, Any], meta: dict[str, Any], files: dict[str, bytes]
    ) -> None:
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        dcp.save(staged, checkpoint_id=str(tmp), process_group=self.group, no_dist=self.no_dist)
        if self.rank == 0:
            for name, content in files.items():
                (tmp / name).write_bytes(content)
            self._commit(tmp, self.root / step_dir_name(step), meta)
            self._prune()

    def _commit(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        (tmp / META).write_text(json.dumps(meta, indent=1))
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        for name in [*files, MANIFEST]:
            _fsync(tmp / name)
        if final.exists():  # an older save of the same step, from before a restart
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / MARKER).write_text(_sha256(final / MANIFEST))
        _fsync(final / MARKER)
        _fsync(self.root)

    def _prune(self) -> None:
        for old in committed_checkpoints(self.root)[self.cfg.keep :]:
            shutil.rmtree(old, ignore_errors=True)
