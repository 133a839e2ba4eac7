"""Read a trained model back from a run directory or a checkpoint: what export and serve need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.checkpoint.store import CheckpointError, latest_good, load_tensors, read_meta, verify
from ostinato.config import Config, from_dict
from ostinato.data.tokenizer import load_tokenizer
from ostinato.model.llama import Llama


@dataclass
class TrainedModel:
    model: Llama
    config: Config
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path  # the checkpoint directory it came from


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its newest good checkpoint; a checkpoint directory must verify."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = latest_good(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path}: the run has no finished, intact checkpoint yet.")
        return found
    if not path.is_dir():
        raise CheckpointError(f"{path}: neither a run directory nor a checkpoint directory.")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"{path} cannot be used: {problem}.")
    return path


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The model (eval mode, fp32, on `device`), its config and tokenizer from a checkpoint."""
    checkpoint = resolve_checkpoint(path)
    meta = read_meta(checkpoint)
    config = from_dict(meta["config"])
    model = Llama(config.model)
    load_tensors(checkpoint, {"model": model.state_dict()})
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return TrainedModel(model.to(device).eval(), config, tokenizer, meta, checkpoint)
