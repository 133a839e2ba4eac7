"""Byte-level BPE tokenizer built with the `tokenizers` library, saved as tokenizer.json."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose numbers are split into single digits first (as Llama 3's and
    DeepSeek's tokenizers do), so 45 and 145 share their digits' tokens and sums can be learnt
    column by column; no merge ever spans two digits."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def read_tokenizer_file(path: str | Path) -> Tokenizer:
    """A tokenizer.json from disk (any model's); a ValueError names the file if it is missing
    or is not one. Only JSON is read: the `tokenizers` library runs no code from it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path}: no such file. Give a tokenizer.json.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"tokenizer {path} is not a tokenizer.json: {reason}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer ostinato can train with: it must have the EOS token documents end with."""
    tokenizer = read_tokenizer_file(path)
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
