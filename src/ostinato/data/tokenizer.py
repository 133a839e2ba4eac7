"""Byte-level BPE tokenizer built with the `tokenizers` library, saved as tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.tokenizer = {str(path)!r} does not exist. Give a tokenizer.json.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"data.tokenizer = {str(path)!r} is not a tokenizer.json: {exc}") from None
    if tokenizer.token_to_id(EOS) is None:
        raise ValueError(
            f"tokenizer {path} has no {EOS} token; ostinato separates documents with it."
        )
    return tokenizer


def check_vocab(tokenizer: Tokenizer, vocab_size: int, source: str) -> None:
    size = tokenizer.get_vocab_size()
    if size > vocab_size:
        raise ValueError(
            f"tokenizer {source} has {size} tokens but model.vocab_size is {vocab_size}. "
            f"Set --model.vocab_size={size} or larger, or use a tokenizer trained for this model."
        )


def eos_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(EOS)
