"""What a training checkpoint holds, and how it is put back.

Named parts, as in TorchTitan: `model` and `optimizer` (tensors, through DCP), and in JSON:
`data` (stream position), `rng`, `train_state`, the resolved `config` and the software stack.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ostinato.checkpoint.store import (
    CheckpointError,
    committed_checkpoints,
    latest_good,
    load_tensors,
    read_meta,
    verify,
)
from ostinato.train.parallel import local_part

log = logging.getLogger("ostinato")


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state up front, exactly as its first step would, so DCP can load into it."""
    for param in model.parameters():
        if param.requires_grad and param not in optimizer.state:
            optimizer.state[param] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer tensors keyed by parameter name (resharding-friendly, no pickles)."""
    optim = {
        name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state
    }
    return {"model": model.state_dict(), "optimizer": optim}


def parameter_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit: equal digests mean identical models
    (of a sharded model, identical shards on this rank)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        tensor = local_part(tensor)  # of a sharded model, this rank's shard
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    state = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)
    torch.set_rng_state(state)


def find_resume_point(resume: str, checkpoints: Path) -> Path | None:
    """`auto`: the newest good checkpoint of this run, if any; `none`: start over; else a path."""
    if resume == "none":
        if committed_checkpoints(checkpoints):
            log.info("--resume none: removing the earlier checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints, ignore_errors=True)
        return None
    if resume == "auto":
        return latest_good(checkpoints)
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory: its newest good checkpoint
        found = latest_good(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"--resume {resume}: the run has no usable checkpoint.")
        return found
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint. Use auto, none, a run directory or a "
            f"checkpoint directory (RUN_DIR/checkpoints/step_...)."
        )
    problem = verify(path)
    if problem:
        raise CheckpointError(f"--resume {resume}: {problem}. Pick an earlier checkpoint.")
    return path


def differing_fields(section: str, saved: dict[str, Any], current: dict[str, Any], where: str):
    """'section.key: saved in `where`, current now' for every key of `current` that differs."""
    return [
        f"{section}.{k}: {saved.get(k)!r} in {where}, {v!r} now"
        for k, v in current.items()
        if saved.get(k) != v
    ]


def check_compatible(meta: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """The model must be the same shape; anything else (steps, lr, ...) may change on resume."""
    differing = differing_fields(
        "model", meta["config"]["model"], config["model"], "the checkpoint"
    )
    if differing:
        raise CheckpointError(
            f"checkpoint {path} was written for another model ("
            + "; ".join(differing)
            + "). Resume with the checkpoint's config (its meta.json has it), or --resume none."
        )


def restore(path: Path, tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Load a verified checkpoint into `tensors` in place; returns its JSON metadata.

    A checkpoint made by `ostinato import` holds only `model` (meta "parts"): the optimizer
    then starts fresh and the data stream at its beginning.
    """
    meta = read_meta(path)
    check_compatible(meta, config, path)
    parts = meta.get("parts", ["model", "optimizer"])
    load_tensors(path, {name: tensors[name] for name in parts})
    if meta.get("rng"):
        set_rng_state(meta["rng"])
    return meta
