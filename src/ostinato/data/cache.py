"""The tokenized corpus, cached in the run directory: a restarted island reads its token array
back instead of tokenizing the corpus again (on the demo corpus, ~1 s of a restart's 5).

The cache is keyed by what the tokens are a function of: the tokenizer (its JSON) and the
documents (their text, in order). A file whose key differs, or whose tokens fail their checksum
(a torn or corrupted write), is ignored and rewritten. It is written as safetensors, through a
temporary file and a rename, so a kill mid-write leaves the previous file or none.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from ostinato.data.stream import tokenize

log = logging.getLogger("ostinato")
CACHE_FILE = "tokens.safetensors"


def corpus_key(tokenizer: Tokenizer, texts: list[str]) -> str:
    digest = hashlib.sha256(tokenizer.to_str().encode())
    for text in texts:
        data = text.encode(errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def cached_tokens(tokenizer: Tokenizer, texts: list[str], cache_dir: Path) -> torch.Tensor:
    """`tokenize(tokenizer, texts)`, from the cache when it holds them."""
    key = corpus_key(tokenizer, texts)
    path = cache_dir / CACHE_FILE
    tokens = _read(path, key)
    if tokens is not None:
        log.info("read %d tokens from the corpus cache %s", len(tokens), path)
        return tokens
    tokens = tokenize(tokenizer, texts)
    _write(path, key, tokens)
    return tokens


def _read(path: Path, key: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        meta = _metadata(path)
        if meta.get("key") != key:
            return None
        tokens = load_file(str(path))["tokens"]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        log.warning("corpus cache %s unreadable (%s); tokenizing again", path, exc)
        return None
    if tokens.dtype != torch.int64 or tokens_digest(tokens) != meta.get("sha256"):
        log.warning("corpus cache %s fails its checksum; tokenizing again", path)
        return None
    return tokens


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as opened:
        return opened.metadata() or {}


def _write(path: Path, key: str, tokens: torch.Tensor) -> None:
    """Atomically (temporary file, fsync, rename); a failure only costs the next start time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {"tokens": tokens}, str(tmp), metadata={"key": key, "sha256": tokens_digest(tokens)}
        )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the corpus cache %s (%s)", path, exc)
        tmp.unlink(missing_ok=True)
