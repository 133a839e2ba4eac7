"""`fleet local --ranks`: islands of different rank counts train one model. A small fleet on
step budgets with generous timeouts, beside the tests/dist group (as test_warm_start_fleet.py)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from ostinato.checkpoint.store import committed_checkpoints
from ostinato.cli import app
from ostinato.fleet.guards import read_guard_log
from ostinato.jsonl import read_jsonl
from tests.conftest import TINY
from tests.dist.fleet_helpers import final_digests, fleet_local, rounds

pytestmark = pytest.mark.timeout(300)
# every round waits for both islands however slowly a torchrun island starts on a busy machine
PATIENT = ["--fleet.min_islands=2", "--fleet.connect_timeout_s=600"]
PATIENT += ["--fleet.heartbeat_timeout_s=60", "--fleet.progress_timeout_s=120"]


def test_an_island_of_two_ranks_and_one_of_one_train_one_model(tmp_path):
    """Two fleets at once, island a of 2 ranks and b of 1 in each: with parallel.strategy auto
    a replicates its model (ddp, auto's choice in a fleet); with fsdp it shards it. In both the
    fleet state is cut into 2 fleet shards (fleet local sets the largest island's ranks): each
    of a's ranks holds and exchanges one, b's one rank both. Both commit every round with both
    islands, and end equal.

    The two fleets see the same tokens from the same init and differ in the order of a's
    gradient sums (about 1e-7 of a value) and in what that moves across int8 rounding edges:
    their final losses agree to 1.2e-6 (measured); 1e-4 allows 100 times that, while an island
    whose shards were not gathered (its pseudo-gradients measured from stale values) ends 48%
    higher."""
    runs = {}
    for strategy in ("auto", "fsdp"):
        out = tmp_path / strategy
        runs[strategy] = fleet_local(out, 2, "--ranks", "2,1", "--no-warm-spare",
                                     "--train.steps=15", "--fleet.budget=steps:5",
                                     "--train.eval_problems=0", "--train.samples=0",
                                     f"--parallel.strategy={strategy}", *PATIENT)  # fmt: skip
    losses = {}
    for strategy, run in runs.items():
        out = tmp_path / strategy
        assert run.wait(280) == 0, (strategy, run.output[-4000:])
        committed = rounds(out)
        assert len(committed) == 3, committed
        assert all(r["members"] == ["a", "b"] for r in committed), committed
        assert len(set(final_digests(out, ["a", "b"]).values())) == 1
        summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in "ab"}
        expected = "ddp" if strategy == "auto" else "fsdp"
        assert (summaries["a"]["strategy"], summaries["a"]["world_size"]) == (expected, 2)
        assert (summaries["b"]["strategy"], summaries["b"]["world_size"]) == ("single", 1)
        tokens = {n: read_jsonl(out / n / "metrics.jsonl")[0]["tokens"] for n in "ab"}
        assert tokens["a"] == 2 * tokens["b"]  # two ranks, each a batch
        assert all(r["shards"] == 2 for r in committed)
        # a's ranks hold one fleet shard each, b's one rank both: the same bytes in all (the
        # shards are equal halves but for the cut's rounding, < 1 fp32 value per tensor kind)
        held_a, held_b = (summaries[n]["fleet_state_bytes_per_rank"] for n in "ab")
        assert len(held_a) == 2 and abs(sum(held_a) - held_b[0]) == 0
        assert max(held_a) <= held_b[0] / 2 + 3 * 4
        losses[strategy] = summaries["a"]["val_loss"]
    assert losses["fsdp"] == pytest.approx(losses["auto"], rel=1e-4), losses


@pytest.mark.parametrize("ranks", ["2", "2,0", "2,x", "1,2,3"])
def test_a_wrong_ranks_list_is_refused_before_anything_starts(tmp_path, ranks):
    out = tmp_path / "fleet"
    result = CliRunner().invoke(app, ["fleet", "local", "--config", str(TINY), "--out", str(out),
                                      "--islands", "2", "--ranks", ranks])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--ranks {ranks!r}: give 2 whole numbers >= 1" in result.stderr
    assert not out.exists()


def test_a_flipped_bit_in_one_fleet_shard_is_found_by_its_digest_and_healed(tmp_path):
    """A 2-rank FSDP island a and a 1-rank island b, 2 fleet shards: a bit of b's global state
    flips after round 2 (in its first shard, 0). The next round's digests differ in that shard
    only; the digest guard names it and quarantines b, and a heals it shard by shard (each of
    a's ranks sends the shard it owns; a joiner of several ranks is healed in
    tests/dist/test_fleet.py): the fleet ends with both islands on the same parameters.
    With min_islands 2 the quarantine leaves too few: the round is retried once, disagrees
    again (the flip is in b's held state, which an abort keeps), and then commits without b."""
    out = tmp_path / "fleet"
    # a long grace keeps every round waiting for both (b alone would have no one to be
    # compared with, and a late a would be healed from b's flipped state)
    patient = [*PATIENT, "--fleet.grace_s=120"]
    run = fleet_local(out, 2, "--ranks", "2,1", "--no-warm-spare", "--train.steps=20",
                      "--fleet.budget=steps:5", "--train.eval_problems=0", "--train.samples=0",
                      "--parallel.strategy=fsdp", "--for", "b:faults.schedule=bitflip@round=2",
                      *patient)  # fmt: skip
    assert run.wait(280) == 0, run.output[-4000:]
    digest_events = [g for g in read_guard_log(out) if g["guard"] == "digest"]
    seen = [(g["island"], g["shards"], g["round"]) for g in digest_events]
    assert seen == [("b", [0], seen[0][2])] * 2, digest_events  # an attempt and its retry
    committed = rounds(out)
    assert [r["round"] for r in committed] == [1, 2, 3, 4]
    flipped = committed[seen[0][2] - 1]
    assert flipped["quarantined"] == ["b"] and flipped["members"] == ["a"]
    assert flipped["attempt"] == 1
    assert committed[-1]["members"] == ["a", "b"]  # healed, and a member again
    assert len(set(final_digests(out, ["a", "b"]).values())) == 1


def test_islands_of_four_two_and_one_ranks_train_one_model(tmp_path):
    """Islands of 4, 2 and 1 FSDP ranks (7 processes) in one fleet: the fleet state is cut into
    4 shards (the largest island's ranks), so a's ranks hold one shard each, b's two, c's one rank
    all four, and shard k crosses between its three owners. Every round commits with all three
    islands, and all end on the same parameters."""
    out = tmp_path / "fleet"
    run = fleet_local(out, 3, "--ranks", "4,2,1", "--no-warm-spare", "--train.steps=10",
                      "--fleet.budget=steps:5", "--train.eval_problems=0", "--train.samples=0",
                      "--parallel.strategy=fsdp", "--fleet.min_islands=3",
                      *PATIENT[1:])  # fmt: skip
    assert run.wait(280) == 0, run.output[-4000:]
    committed = rounds(out)
    assert [(r["round"], r["members"], r["shards"]) for r in committed] == [
        (n, ["a", "b", "c"], 4) for n in (1, 2)
    ]
    held = {n: json.loads((out / n / "summary.json").read_text()) for n in "abc"}
    held = {n: s["fleet_state_bytes_per_rank"] for n, s in held.items()}
    assert [len(held[n]) for n in "abc"] == [4, 2, 1]
    whole = held["c"][0]  # one rank holds all of it
    assert sum(held["a"]) == sum(held["b"]) == whole
    assert max(held["a"]) <= whole / 4 + 3 * 4 and max(held["b"]) <= whole / 2 + 3 * 4
    assert len(set(final_digests(out, ["a", "b", "c"]).values())) == 1


def test_a_sharded_island_overlaps_its_exchange_with_training(tmp_path):
    """Streaming DiLoCo with overlap on a 2-rank FSDP island and a 1-rank island, 2 fleet shards:
    every rank of a runs its side of each exchange in the background (the leader's protocol, the
    other rank following it) while both train on, and merges the result into its rows later.
    Every round commits with both, and both end on the last round's parameters."""
    out = tmp_path / "fleet"
    run = fleet_local(out, 2, "--ranks", "2,1", "--no-warm-spare", "--train.steps=30",
                      "--fleet.budget=steps:6", "--fleet.fragments=2", "--fleet.overlap=2",
                      "--train.eval_problems=0", "--train.samples=0", "--parallel.strategy=fsdp",
                      *PATIENT)  # fmt: skip
    assert run.wait(280) == 0, run.output[-4000:]
    committed = rounds(out)
    assert [(r["round"], r["members"]) for r in committed] == [
        (n, ["a", "b"]) for n in range(1, 11)
    ]
    assert set(final_digests(out, ["a", "b"]).values()) == {committed[-1]["digest"]}


def test_a_sharded_fleet_resumes_from_its_per_shard_fleet_checkpoints(tmp_path):
    """Fleet checkpoints of a fleet state in 2 shards are written per shard, each by its owner
    (fleet/checkpoints/shard-k). The islands then lose their own checkpoints: on --resume auto
    every rank restores its shards from the newest round that all shards have, and the fleet
    carries on from it under the next round numbers."""
    out = tmp_path / "fleet"
    common = ["--ranks", "2,1", "--no-warm-spare", "--fleet.budget=steps:5",
              "--fleet.checkpoint_every=2", "--train.eval_problems=0", "--train.samples=0",
              "--parallel.strategy=fsdp", *PATIENT]  # fmt: skip
    first = fleet_local(out, 2, "--train.steps=20", *common)
    assert first.wait(280) == 0, first.output[-4000:]
    for shard in (0, 1):
        assert committed_checkpoints(out / "fleet" / "checkpoints" / f"shard-{shard}")
    for name in ("a", "b"):  # the islands lost their disks: only the fleet checkpoint is left
        shutil.rmtree(out / name / "checkpoints")
    more = fleet_local(out, 2, "--train.steps=30", "--resume", "auto", *common)
    assert more.wait(280) == 0, more.output[-4000:]
    assert "resumed from fleet checkpoint" in more.output
    committed = rounds(out)
    assert [r["round"] for r in committed] == list(range(1, 7))
    assert set(final_digests(out, ["a", "b"]).values()) == {committed[-1]["digest"]}
