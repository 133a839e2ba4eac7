"""Prove that an export computes what was trained, on the hardware that will serve it.

The trained checkpoint (our model, fp32) and the export (loaded by transformers, in its stored
dtype) read the same fixed texts on the same device; we compare their logits, the greedy token
each picks at every position, and their perplexities. A broken conversion or a faulty kernel
on the serving device shows up as a large logit difference or disagreeing tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ostinato.checkpoint.reader import load_trained
from ostinato.data.reasoning import make_problem
from ostinato.data.tokenizer import EOS
from ostinato.model import hf
from ostinato.serve.convert import PROVENANCE
from ostinato.serve.launch import resolve_device

# Largest logit difference and least greedy agreement accepted, by export dtype: fp32 must
# match to rounding; half precision rounds every weight, so only the choices must mostly agree.
TOLERANCES = {"fp32": (1e-3, 0.98), "fp16": (0.1, 0.9), "bf16": (0.5, 0.9)}
PLAIN_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "A checkpoint is written to a temporary name, checksummed, then renamed.",
)


@dataclass
class Verification:
    device: str
    dtype: str
    texts: int
    tokens: int
    max_abs_diff: float
    agreement: float  # share of positions where both models' argmax agree
    ppl_trained: float
    ppl_export: float
    tolerance: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.agreement >= self.min_agreement


def load_export(export_dir: Path):
    """The export as transformers loads it: safetensors only (a .bin file would be unpickled),
    and no code from the directory."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(
        export_dir, use_safetensors=True, trust_remote_code=False
    )


def fixed_texts() -> list[str]:
    """Worked problems in the demo's format (held out by split name) and plain sentences."""
    problems = [make_problem(0, "verify", i).text + EOS for i in range(6)]
    return problems + list(PLAIN_TEXTS)


def find_checkpoint(export_dir: Path, checkpoint: Path | None) -> Path:
    if checkpoint is not None:
        return checkpoint
    provenance = export_dir / PROVENANCE
    if not provenance.is_file():
        raise ValueError(
            f"{export_dir}: no {PROVENANCE} naming the trained checkpoint; pass --checkpoint"
        )
    named = hf.read_json(provenance).get("checkpoint")
    if not isinstance(named, str) or not named:
        raise ValueError(f'{provenance}: no "checkpoint" path; pass --checkpoint')
    return Path(named)


def export_dtype(export_dir: Path) -> str:
    config = hf.read_hf_config(export_dir)
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return names.get(config.get("torch_dtype") or config.get("dtype"), "fp32")


@torch.no_grad()
def verify_export(
    export_dir: Path,
    device: str = "cpu",
    checkpoint: Path | None = None,
    tolerance: float | None = None,
    min_agreement: float | None = None,
) -> Verification:
    if not (export_dir / "config.json").is_file():
        raise ValueError(f"{export_dir}: no config.json; verify checks an HF export directory")
    place = resolve_device(device)
    # The checkpoint first: a refused one fails before transformers is even imported.
    trained = load_trained(find_checkpoint(export_dir, checkpoint), place)
    dtype = export_dtype(export_dir)
    exported = load_export(export_dir).to(place, hf.DTYPES[dtype]).eval()
    diff, agree, nll_ours, nll_theirs, count = 0.0, 0, 0.0, 0.0, 0
    for text in fixed_texts():
        ids = trained.tokenizer.encode(text, add_special_tokens=False).ids
        ids = torch.tensor([ids[: trained.model.cfg.max_seq_len]], device=place)
        ours = trained.model(ids)[0].float()
        theirs = exported(ids).logits[0].float()
        diff = max(diff, float((ours - theirs).abs().max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        targets = ids[0, 1:]
        nll_ours += float(F.cross_entropy(ours[:-1], targets, reduction="sum"))
        nll_theirs += float(F.cross_entropy(theirs[:-1], targets, reduction="sum"))
        count += len(targets)
    default_tol, default_agree = TOLERANCES[dtype]
    positions = count + len(fixed_texts())
    return Verification(
        device=str(place),
        dtype=dtype,
        texts=len(fixed_texts()),
        tokens=positions,
        max_abs_diff=diff,
        agreement=agree / positions,
        ppl_trained=math.exp(nll_ours / count),
        ppl_export=math.exp(nll_theirs / count),
        tolerance=default_tol if tolerance is None else tolerance,
        min_agreement=default_agree if min_agreement is None else min_agreement,
    )
