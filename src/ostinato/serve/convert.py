"""Export a trained checkpoint to a Hugging Face (or GGUF) directory, and import one back.

An export directory is what every other stack loads: transformers, vLLM, vllm-ascend, MindIE
(HF layout) or llama.cpp (GGUF). It also carries `ostinato.json`, naming the checkpoint it
came from, so `ostinato verify` can compare the two without being told.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.store import CheckpointWriter, committed_checkpoints
from ostinato.config import CheckpointConfig, Config, DataConfig, save_config
from ostinato.data.tokenizer import EOS, check_vocab, eos_id, load_tokenizer
from ostinato.model import hf
from ostinato.model.llama import Llama
from ostinato.serve.text import CHAT_TEMPLATE

log = logging.getLogger("ostinato")
PROVENANCE = "ostinato.json"
# Head sizes vLLM's CPU attention accepts (FACTS.md); others load and fail at the first forward.
VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
FORMATS = ("hf", "gguf")


def export_model(
    source: str | Path,
    out: Path,
    dtype: str = "fp32",
    fmt: str = "hf",
    max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write the model of a run or checkpoint to `out`; returns the weight files written.

    Everything is written into a fresh directory next to `out` that then replaces it, so a
    re-export never leaves files of the previous one (a stale shard index, extra shards).
    """
    if dtype not in hf.DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(hf.DTYPES)}")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(os.path.abspath(out))  # lexically: `--out x/..` names x's parent, not ".."
    check_replaceable(out)
    trained = load_trained(source, "cpu")  # refuses unfinished, corrupted or hostile checkpoints
    warn_head_size(trained.model.cfg.head_dim)
    with fresh_directory(out) as tmp:
        if fmt == "gguf":
            from ostinato.serve.gguf_export import write_gguf

            gguf_file = tmp / "model.gguf"
            files = [write_gguf(trained.model, trained.tokenizer, gguf_file, dtype, out.name)]
        else:
            files = write_hf_dir(
                trained.model, trained.tokenizer, tmp, hf.DTYPES[dtype], max_shard_bytes
            )
        provenance = {"checkpoint": str(trained.path.resolve()), "step": trained.meta["step"]}
        _write_json(tmp / PROVENANCE, {**provenance, "dtype": dtype, "format": fmt})
    return [out / f.relative_to(tmp) for f in files]


def check_replaceable(out: Path) -> None:
    """`out` may be replaced if it is absent, empty, or an earlier export (it has ostinato.json);
    anything else may be someone's files, which an export must never delete."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory to export into")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise ValueError(
            f"--out {out} holds files that are not an ostinato export (no {PROVENANCE}); "
            "give a new or empty directory"
        )


@contextmanager
def fresh_directory(out: Path) -> Iterator[Path]:
    """An empty directory beside `out` that replaces it when the block succeeds, and is
    deleted when it fails. A reader of `out` sees the old export or the new one, never a mix
    (between the two renames `out` is absent for an instant)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()  # with the umask's permissions: a serving stack may run as another user
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def warn_head_size(head_dim: int) -> None:
    if head_dim not in VLLM_HEAD_SIZES:
        log.warning(
            "head size %d is not one vLLM's CPU attention accepts (%s): vLLM will load this "
            "model and fail at its first forward pass. transformers and ostinato serve still work.",
            head_dim,
            ", ".join(map(str, VLLM_HEAD_SIZES)),
        )


def write_hf_dir(
    model: Llama, tokenizer: Tokenizer, out: Path, dtype: torch.dtype, max_shard_bytes: int
) -> list[Path]:
    eos = eos_id(tokenizer)
    files = hf.save_safetensors(hf.to_hf_tensors(model, dtype), out, max_shard_bytes)
    _write_json(out / "config.json", hf.hf_config(model.cfg, dtype, eos))
    generation = {
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "do_sample": False,  # greedy by default, as `ostinato serve` at temperature 0
        "max_length": model.cfg.max_seq_len,
    }
    _write_json(out / "generation_config.json", generation)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(model.cfg.max_seq_len))
    _write_json(out / "special_tokens_map.json", {k: EOS for k in ("bos_token", "eos_token")})
    return files


def tokenizer_config(max_seq_len: int) -> dict[str, Any]:
    """PreTrainedTokenizerFast settings: no BOS is added, EOS ends documents, chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def import_model(hf_dir: Path, out: Path) -> Path:
    """Turn a local HF Llama directory into run directory `out`; returns its checkpoint."""
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir}: not a directory; import reads a local HF model directory")
    if committed_checkpoints(out / "checkpoints"):
        raise ValueError(f"--out {out} already holds checkpoints; import into a new directory")
    model_cfg = hf.model_config_from_hf(hf.read_hf_config(hf_dir))
    tokenizer = _import_tokenizer(hf_dir, model_cfg.vocab_size)
    model = Llama(model_cfg)
    hf.load_hf_weights(model, hf.load_safetensors(hf_dir))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    # Training from here must keep this tokenizer, not train a new one on the corpus.
    data = DataConfig(
        tokenizer=str((out / "tokenizer.json").resolve()),
        seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len),
    )
    cfg = Config(model=model_cfg, data=data)
    save_config(cfg, out / "config.toml")
    meta = {
        "parts": ["model"],
        "config": cfg.to_dict(),
        "train_state": {"step": 0},
        "data": None,
        "rng": None,
        "imported_from": str(hf_dir.resolve()),
    }
    writer = CheckpointWriter(out / "checkpoints", CheckpointConfig(async_save=False))
    files = {"tokenizer.json": tokenizer.to_str().encode()}
    writer.save(0, {"model": model.state_dict()}, meta, files)
    writer.wait()
    return committed_checkpoints(out / "checkpoints")[0]


def _import_tokenizer(hf_dir: Path, vocab_size: int) -> Tokenizer:
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"{hf_dir}: no tokenizer.json (fast tokenizer); slow sentencepiece tokenizers are "
            "not supported. Save it with transformers' AutoTokenizer first."
        )
    tokenizer = load_tokenizer(path)  # requires the EOS token ostinato separates documents with
    check_vocab(tokenizer, vocab_size, str(path))
    return tokenizer
