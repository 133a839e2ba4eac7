"""`fleet local --ranks`: islands of different rank counts train one model. A small fleet on
step budgets with generous timeouts, beside the tests/dist group (as test_warm_start_fleet.py)."""

import json

import pytest
from typer.testing import CliRunner

from ostinato.cli import app
from ostinato.jsonl import read_jsonl
from tests.conftest import TINY
from tests.dist.fleet_helpers import final_digests, fleet_local, rounds

pytestmark = pytest.mark.timeout(300)
# every round waits for both islands however slowly a torchrun island starts on a busy machine
PATIENT = ["--fleet.min_islands=2", "--fleet.connect_timeout_s=600"]
PATIENT += ["--fleet.heartbeat_timeout_s=60", "--fleet.progress_timeout_s=120"]


def test_an_island_of_two_ranks_and_one_of_one_train_one_model(tmp_path):
    out = tmp_path / "fleet"
    run = fleet_local(out, 2, "--ranks", "2,1", "--no-warm-spare", "--train.steps=15",
                      "--fleet.budget=steps:5", "--train.eval_problems=0", "--train.samples=0",
                      *PATIENT)  # fmt: skip
    assert run.wait(280) == 0, run.output[-4000:]
    committed = rounds(out)
    assert len(committed) == 3 and all(r["members"] == ["a", "b"] for r in committed), committed
    assert len(set(final_digests(out, ["a", "b"]).values())) == 1
    summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in "ab"}
    # a fleet island of several ranks replicates its model (parallel.strategy auto -> ddp)
    assert (summaries["a"]["strategy"], summaries["a"]["world_size"]) == ("ddp", 2)
    assert (summaries["b"]["strategy"], summaries["b"]["world_size"]) == ("single", 1)
    tokens = {n: read_jsonl(out / n / "metrics.jsonl")[0]["tokens"] for n in "ab"}
    assert tokens["a"] == 2 * tokens["b"]  # two ranks, each a batch


@pytest.mark.parametrize("ranks", ["2", "2,0", "2,x", "1,2,3"])
def test_a_wrong_ranks_list_is_refused_before_anything_starts(tmp_path, ranks):
    out = tmp_path / "fleet"
    result = CliRunner().invoke(app, ["fleet", "local", "--config", str(TINY), "--out", str(out),
                                      "--islands", "2", "--ranks", ranks])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--ranks {ranks!r}: give 2 whole numbers >= 1" in result.stderr
    assert not out.exists()
