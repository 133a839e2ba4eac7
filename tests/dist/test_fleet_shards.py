"""Fleet shards on real ranks: a 2-rank FSDP island under torchrun holds 3 fleet shards
(tests/dist/shard_worker.py). Each rank reads its shards' values from the sharded model, writes
global values back into every rank's rows, runs the leader's operations as a crew, and saves
only its own shards; one process alone then resumes all of them by name. Then the island
warm-starts from a 1-rank run's checkpoint, each rank reading only its own rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, cli_env, run_cli

pytestmark = pytest.mark.timeout(240)
WORKER = Path(__file__).with_name("shard_worker.py")


def test_a_sharded_island_holds_reads_writes_and_saves_only_its_own_fleet_shards(tmp_path):
    warm = tmp_path / "warm"  # a 1-rank run for the sharded island to warm-start from
    trained = run_cli("train", "--config", str(TINY), "--out", str(warm), "--train.steps=2",
                      "--train.eval_problems=0", "--train.samples=0")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*command, str(WORKER), str(tmp_path), str(warm)], capture_output=True,
                          text=True, timeout=200, env=cli_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["mine"] for r in ranks] == [[0, 2], [1]]  # k % 2 == rank
    assert all(r["read_equal"] and r["write_equal"] for r in ranks)
    # the leader's operation ran on both ranks, and both results came back in rank order
    assert ranks[0]["crew"] == [{"rank": 0}, {"rank": 1}]
    assert ranks[0]["ops"] == ranks[1]["ops"] == ["probe"]
    assert ranks[1]["crew_end"] == {"done": True}
    # each rank holds its own shards' global parameters and residual (fp32; no momentum before
    # an outer step) and nothing else: rank 0 two shards of three, rank 1 one
    sizes = ranks[0]["sizes"]
    for report in ranks:
        assert report["held_bytes"] == 2 * 4 * sum(sizes[k] for k in report["mine"])
    assert ranks[0]["resumed_on_one_equal"]
    # a warm start (fleet.warm_start) reads each rank's rows straight into the sharded model
    assert all(r["warm_start_equal"] for r in ranks)
