"""The tokenized-corpus cache: a restart reads the same tokens a cold start computes, and a cache
that is stale (another tokenizer or corpus), torn or corrupted is never used."""

import pytest
import torch

from ostinato.data.cache import CACHE_FILE, cached_tokens
from ostinato.data.stream import TokenStream, tokenize
from ostinato.data.tokenizer import train_tokenizer

pytestmark = pytest.mark.timeout(60)
TEXTS = [f"Bo has {n} pens and gets {n % 7} more. #### {n + n % 7}" for n in range(300)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 300)


def batches(tokens: torch.Tensor, count: int = 12) -> list[torch.Tensor]:
    stream = TokenStream(tokens, seq_len=16, seed=5)
    return [stream.next_batch(4)[0] for _ in range(count)]


def test_a_restart_reads_the_cache_and_streams_bit_identical_batches(tmp_path, tokenizer, caplog):
    cold = tokenize(tokenizer, TEXTS)
    first = cached_tokens(tokenizer, TEXTS, tmp_path)  # writes the cache
    assert (tmp_path / CACHE_FILE).is_file()
    with caplog.at_level("INFO", logger="ostinato"):
        again = cached_tokens(tokenizer, TEXTS, tmp_path)
    assert "from the corpus cache" in caplog.text  # read, not tokenized again
    assert torch.equal(first, cold) and torch.equal(again, cold) and again.dtype == torch.int64
    for restarted, reference in zip(batches(again), batches(cold), strict=True):
        assert torch.equal(restarted, reference)


def test_another_corpus_or_tokenizer_does_not_use_the_cache(tmp_path, tokenizer, caplog):
    cached_tokens(tokenizer, TEXTS, tmp_path)
    other_texts = [*TEXTS[:-1], TEXTS[-1] + "!"]
    assert torch.equal(
        cached_tokens(tokenizer, other_texts, tmp_path), tokenize(tokenizer, other_texts)
    )
    other_tokenizer = train_tokenizer(TEXTS, 280)
    with caplog.at_level("INFO", logger="ostinato"):
        tokens = cached_tokens(other_tokenizer, TEXTS, tmp_path)
    assert "from the corpus cache" not in caplog.text
    assert torch.equal(tokens, tokenize(other_tokenizer, TEXTS))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_cache_is_detected_and_rewritten(tmp_path, tokenizer, caplog, damage):
    cached_tokens(tokenizer, TEXTS, tmp_path)
    path = tmp_path / CACHE_FILE
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10  # one bit of one token
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"\x00" * 64)
    path.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="ostinato"):
        tokens = cached_tokens(tokenizer, TEXTS, tmp_path)
    assert "from the corpus cache" not in caplog.text
    assert torch.equal(tokens, tokenize(tokenizer, TEXTS))
    with caplog.at_level("INFO", logger="ostinato"):
        assert torch.equal(cached_tokens(tokenizer, TEXTS, tmp_path), tokens)
    assert "from the corpus cache" in caplog.text  # rewritten whole
