import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ostinato.config import load_config
from ostinato.data.reasoning import (
    column_difference,
    column_product,
    column_sum,
    extract_answer,
    make_problems,
)
from ostinato.data.sources import load_documents
from ostinato.data.stream import TokenStream, tokenize
from ostinato.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    train, _ = make_problems(seed=1, count=300, heldout=0)
    texts = [p.text for p in train]
    return tokenize(train_tokenizer(texts, 300), texts)


def test_stream_resumes_with_the_same_batches(tokens):
    tokens = tokens[:1200]  # 74 sequences: 40 batches of 4 cross two epoch boundaries
    uninterrupted = TokenStream(tokens, seq_len=16, seed=3)
    expected = [uninterrupted.next_batch(4) for _ in range(40)]  # crosses an epoch boundary
    assert uninterrupted.consumed > uninterrupted.num_sequences

    first = TokenStream(tokens, seq_len=16, seed=3)
    got = [first.next_batch(4) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = TokenStream(tokens, seq_len=16, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(4) for _ in range(27)]
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_targets_are_inputs_shifted_by_one(tokens):
    x, y = TokenStream(tokens, seq_len=16, seed=0).next_batch(2)
    assert x.shape == y.shape == (2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_ranks_split_the_global_batch_so_world_size_can_change(tokens):
    single = TokenStream(tokens, seq_len=16, seed=5)
    ranks = [TokenStream(tokens, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole, _ = single.next_batch(6)
        halves = [stream.next_batch(3)[0] for stream in ranks]
        assert torch.equal(whole, torch.cat(halves))
    assert single.consumed == ranks[0].consumed == ranks[1].consumed


def test_stream_refuses_state_from_other_data(tokens):
    state = TokenStream(tokens, seq_len=16, seed=3).state_dict()
    with pytest.raises(ValueError, match="data.seq_len changed"):
        TokenStream(tokens, seq_len=8, seed=3).load_state_dict(state)


def test_reasoning_corpus_is_deterministic_with_a_disjoint_heldout_split():
    train1, held1 = make_problems(seed=7, count=500, heldout=50)
    train2, held2 = make_problems(seed=7, count=500, heldout=50)
    assert train1 == train2 and held1 == held2
    assert not {p.question for p in train1} & {p.question for p in held1}
    for problem in train1[:50]:
        assert extract_answer(problem.solution) == problem.answer
    assert make_problems(seed=8, count=20, heldout=0)[0] != train1[:20]


def test_files_source_reads_text_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text('{"text": "first row"}\n{"text": "second row"}\n')
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    cfg = load_config(None, ["data.source=files", f'data.path="{tmp_path}"']).data
    docs = load_documents(cfg)
    everything = docs.train + docs.validation
    assert sorted(everything) == sorted(
        ["plain text document", "first row", "second row", "parquet row"]
    )


def test_stdlib_source_reads_python_files():
    cfg = load_config(None, ["data.source=stdlib", "data.max_bytes=200000"]).data
    docs = load_documents(cfg)
    assert sum(map(len, docs.train)) >= 50000 and docs.validation
    assert any("def " in text for text in docs.train)


def test_bad_data_paths_are_named(tmp_path):
    missing = load_config(None, ["data.source=files", f'data.path="{tmp_path}/nope"']).data
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(missing)
    (tmp_path / "empty.txt").write_text("   \n")
    empty = load_config(None, ["data.source=files", f'data.path="{tmp_path}"']).data
    with pytest.raises(ValueError, match="corpus is empty"):
        load_documents(empty)


def test_tokenizer_round_trip_and_vocab_check(tmp_path):
    texts = [p.text for p in make_problems(seed=1, count=200, heldout=0)[0]]
    tokenizer = train_tokenizer(texts, 300)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(path)
    ids = loaded.encode(texts[0]).ids
    assert loaded.decode(ids) == texts[0]
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_vocab(loaded, 100, str(path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_the_tokenizer_gives_each_digit_its_own_token():
    texts = [p.text for p in make_problems(seed=1, count=300, heldout=0)[0]]
    tokenizer = train_tokenizer(texts, 300)
    encoding = tokenizer.encode("What is 127 + 45?")
    digits = [t for t in encoding.tokens if any(c.isdigit() for c in t)]
    assert digits == ["1", "2", "7", "4", "5"]
    assert tokenizer.decode(encoding.ids) == "What is 127 + 45?"


STEP = re.compile(r"(-?\d+) ([-+*]) (\d+)(?: ([-+]) (\d+))? = (-?\d+)")


def checked_steps(solution: str) -> int:
    """Every `x op y [op z] = r` of a worked solution computes r; returns how many there are."""
    found = STEP.findall(solution)
    for x, op, y, op2, z, result in found:
        value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        if op2:
            value = value + int(z) if op2 == "+" else value - int(z)
        assert value == int(result), (solution, x, op, y, op2, z, result)
    return len(found)


def test_every_step_of_every_column_method_is_right():
    """All sums and differences of two 2-digit numbers, all products of the corpus's range:
    each digit-level step is correct, each column writes one digit, and the result is whole."""
    for a in range(10, 100):
        for b in range(10, 100):
            sums = column_sum(a, b)
            assert checked_steps(sums) == 3 and sums.endswith(f"So {a} + {b} = {a + b}.")
            written = [int(d) for d in re.findall(r"write (\d+)", sums)]
            assert int("".join(map(str, written[::-1]))) == a + b
            if a >= b:
                diff = column_difference(a, b)
                assert checked_steps(diff) >= 3 and diff.endswith(f"So {a} - {b} = {a - b}.")
    for a in range(11, 50):
        for b in range(2, 10):
            product = column_product(a, b)
            assert checked_steps(product) >= 3 and product.endswith(f"So {a} * {b} = {a * b}.")
            assert "carry" in product or a % 10 * b < 10


def test_every_problem_of_the_corpus_is_worked_right():
    train, held = make_problems(seed=3, count=2000, heldout=200)
    for problem in train + held:
        assert checked_steps(problem.solution) >= 3, problem
        assert extract_answer(problem.solution) == problem.answer
