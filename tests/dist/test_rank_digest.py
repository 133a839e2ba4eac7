"""The rank digest guard: a bit flipped in one rank's parameters is found and repaired inside
the island; without the guard the two ranks silently train different models."""

import json
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.dist.test_ddp import WORKER, torchrun

pytestmark = pytest.mark.timeout(240)
# No checkpoints until the end: a rollback by the non-finite guard must not heal the flip instead.
# Replicas (ddp): the guard compares copies of the model, which sharded ranks do not hold.
RUN = ("train.steps=12", "checkpoint.every=0", "faults.schedule=bitflip@step=8", "parallel.strategy=ddp")


def rank_digests(out: Path) -> list[str]:
    return [json.loads((out / f"rank{r}.json").read_text())["digest"] for r in (0, 1)]


def test_a_flipped_bit_on_one_rank_is_repaired_from_the_others(tmp_path):
    out = tmp_path / "run"
    done = torchrun(2, str(WORKER), str(TINY), str(out), *RUN, "guards.digest_every=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fault bitflip: after step 8, rank 1's" in done.stderr
    assert "guard digest: rank 1's parameters differ from the island's; repaired from rank 0" in (
        done.stderr
    )
    first, second = rank_digests(out)
    assert first == second
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "detect" and "guard digest" in e["label"] for e in events)


def test_without_the_digest_guard_the_ranks_end_different(tmp_path):
    out = tmp_path / "run"
    done = torchrun(2, str(WORKER), str(TINY), str(out), *RUN, "guards.digest_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fault bitflip" in done.stderr and "guard digest" not in done.stderr
    first, second = rank_digests(out)
    assert first != second
