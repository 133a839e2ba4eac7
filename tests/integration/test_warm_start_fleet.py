"""fleet.warm_start from the command line: a fleet of two islands begins where a run of
`ostinato train` ended. A small fleet (two islands and a coordinator) that runs beside the
tests/dist group, as the CLI tests' own coordinators do."""

import pytest
from tokenizers import Tokenizer

from ostinato.config import load_config
from ostinato.data.sources import load_documents
from ostinato.data.tokenizer import train_tokenizer
from ostinato.fleet.compress import message_bytes
from ostinato.fleet.outer import flatten
from ostinato.jsonl import read_jsonl
from ostinato.model.llama import Llama
from tests.conftest import TINY, run_cli
from tests.dist.fleet_helpers import final_digests, fleet_local, rounds

pytestmark = pytest.mark.timeout(300)


def test_a_warm_started_fleet_starts_from_the_run_and_its_tokenizer(tmp_path):
    """fleet.warm_start: both islands begin where a 30-step run of `ostinato train` ended, not
    at the seeded init: their first loss is below the midpoint between that run's first and
    last losses (the run's own training moved it that far), and they train with its tokenizer."""
    warm = tmp_path / "warm"
    # another corpus seed: its tokenizer is not the one the islands would train themselves
    done = run_cli("train", "--config", str(TINY), "--out", str(warm), "--train.steps=30",
                   "--data.seed=7", "--train.eval_problems=0", "--train.samples=0",
                   timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    warm_losses = [r["loss"] for r in read_jsonl(warm / "metrics.jsonl")]
    midpoint = (warm_losses[0] + sum(warm_losses[-5:]) / 5) / 2
    assert warm_losses[0] - midpoint > 0.2, warm_losses  # the run did learn
    out = tmp_path / "fleet"
    run = fleet_local(out, 2, "--no-warm-spare", "--train.steps=20", "--fleet.budget=steps:5",
                      f"--fleet.warm_start={warm}", "--train.eval_problems=0")  # fmt: skip
    assert run.wait() == 0, run.output[-3000:]
    assert "warm start: every island starts from" in run.output
    for name in ("a", "b"):
        first = read_jsonl(out / name / "metrics.jsonl")[0]["loss"]
        assert first < midpoint, (name, first, warm_losses)
        assert tokenizer_of(out / name) == tokenizer_of(warm)
    cfg = load_config(TINY)
    own = train_tokenizer(load_documents(cfg.data).train, cfg.model.vocab_size)
    assert own.to_str() != tokenizer_of(warm)


def tokenizer_of(run) -> str:
    return Tokenizer.from_file(str(run / "tokenizer.json")).to_str()


def test_warm_start_steps_train_the_first_steps_synchronously(tmp_path):
    """fleet.warm_start_steps = 4: the fleet's first 4 rounds are one inner step each, sent in
    fp32 whatever fleet.compression says (int4 here) and marked warm in rounds.jsonl; then the
    DiLoCo rounds of H = 4 take the other 12 steps, in int4. Every round commits with one
    digest, and both islands end on it."""
    out = tmp_path / "fleet"
    run = fleet_local(out, 2, "--no-warm-spare", "--train.steps=16", "--fleet.budget=steps:4",
                      "--fleet.warm_start_steps=4", "--fleet.compression=int4",
                      "--train.eval_problems=0", "--train.samples=0")  # fmt: skip
    assert run.wait() == 0, run.output[-3000:]
    log = rounds(out)
    assert [r["round"] for r in log] == list(range(1, 8)), log
    cfg = load_config(TINY)
    numel = flatten(Llama(cfg.model)).numel()
    for record in log:
        kind = "fp32" if record["round"] <= 4 else "int4"
        assert record["warm"] == (record["round"] <= 4)
        one_peer = message_bytes(numel, kind, cfg.fleet.block)  # an all-gather of 2
        assert record["bytes_sent"] == {"a": one_peer, "b": one_peer}, (kind, record)
        assert sum(record["tokens"].values()) > 0
    warm_tokens = log[0]["tokens"]["a"]
    assert log[4]["tokens"]["a"] == 4 * warm_tokens  # H = 4 steps of the same batch
    digests = final_digests(out, ["a", "b"])
    assert digests["a"] == digests["b"] == log[-1]["digest"]
    for name in ("a", "b"):
        steps = [r["step"] for r in read_jsonl(out / name / "metrics.jsonl") if "loss" in r]
        assert steps[-1] == 16, (name, steps)
