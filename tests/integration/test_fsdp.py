"""Sharded islands (FSDP2 over gloo ranks under torchrun): the same model and steps as one rank,
checkpoints that resume on another rank count, and a SIGKILL that costs no bit.

Equal tokens throughout: 2 ranks of batch 4, 4 ranks of batch 2 and 1 rank of batch 8 train
on the same 8 sequences per step (TokenStream hands rank r the r-th share of each global
batch), so their losses differ only by the order in which fp32 sums are taken."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ostinato.config import load_config
from ostinato.model.llama import Llama, count_parameters
from ostinato.train.memory import state_bytes_per_rank
from ostinato.train.metrics import read_metrics
from tests.conftest import TINY, cli_env
from tests.dist.test_ddp import WORKER
from tests.integration.test_resume import assert_identical

pytestmark = pytest.mark.timeout(300)
RECIPE = ["--train.steps=10", "--checkpoint.every=5", "--checkpoint.keep=5", "--train.samples=0"]
GLOBAL_BATCH = 8
# The first step's loss is one mean over the same 8 x 32 token losses, taken as one sum or as
# the mean of 2 or 4 partial sums: fp32 rounding moves it by a few ulps, about 1e-7 of it.
# Each later step feeds that difference through AdamW's normalised update; 1e-4 is 100 times
# what was measured (2e-7 after 10 steps), while a shard drawn or loaded in the wrong place
# moves the loss by more than 1e-2.
FIRST_STEP_RTOL, LATER_RTOL = 1e-5, 1e-4


def launch(ranks: int, out: Path, *extra: str) -> subprocess.Popen:
    """`ostinato train` on `ranks` ranks (torchrun) or one process, batch sized to equal tokens."""
    batch = f"--train.batch_size={GLOBAL_BATCH // ranks}"
    args = ["train", "--config", str(TINY), "--out", str(out), *RECIPE, batch, *extra]
    if ranks == 1:
        command = [sys.executable, "-m", "ostinato", *args]
    else:
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*run, f"--nproc_per_node={ranks}", "-m", "ostinato", *args]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env()
    )


def train(ranks: int, out: Path, *extra: str) -> Path:
    process = launch(ranks, out, *extra)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    return out


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}


def assert_same_steps(run: Path, reference: Path, first: int) -> None:
    got, expected = losses(run), losses(reference)
    assert sorted(got) == list(range(first, 11)), sorted(got)
    for step in range(first, 11):
        rtol = FIRST_STEP_RTOL if step == first else LATER_RTOL
        assert got[step] == pytest.approx(expected[step], rel=rtol), (step, got, expected)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two ranks, FSDP (the default with more than one rank), 10 steps, uninterrupted."""
    return train(2, tmp_path_factory.mktemp("sharded") / "run")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return train(1, tmp_path_factory.mktemp("single") / "run")


def test_two_shards_start_and_train_as_one_rank_does(sharded, single):
    """The seeded init does not depend on the rank count, and every step matches."""
    assert_same_steps(sharded, single, first=1)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (sharded, single)]
    assert [(s["strategy"], s["world_size"]) for s in summaries] == [("fsdp", 2), ("single", 1)]
    # What the trainer measured from its tensors is the planner's formula (train/memory.py),
    # plus AdamW's 4-byte step counter per parameter tensor (no padding: tiny's rows are even).
    params = count_parameters(Llama(load_config(TINY).model))
    counters = 4 * 21  # 21 parameter tensors
    for summary in summaries:
        formula = state_bytes_per_rank(params, summary["strategy"], summary["world_size"])
        assert summary["state_bytes_per_rank"] == formula + counters, summary
    newest = sorted((sharded / "checkpoints").glob("step_*"))[-1]
    # each rank wrote only its own shards
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_accumulated_micro_batches_train_as_one_batch(tmp_path, single):
    """2 ranks x 2 micro-batches of 2 take the same 8 sequences per step as 1 rank's batch of 8
    (the stream hands them out in the same order), each micro-batch's gradients reduce-scattered
    as it ends; the tolerances are the ones above."""
    accumulated = train(2, tmp_path / "run", "--train.grad_accum=2", "--train.batch_size=2")
    assert_same_steps(accumulated, single, first=1)


def test_recomputing_activations_changes_no_bit_of_the_loss_curve(tmp_path, sharded):
    recomputed = train(2, tmp_path / "run", "--parallel.activation_checkpointing=full")
    assert losses(recomputed) == losses(sharded)  # the same forward, run again in backward


@pytest.mark.parametrize(
    ("saved_on", "ranks", "extra"),
    [
        ("sharded", 1, ()),  # 2 -> 1
        ("single", 2, ()),  # 1 -> 2
        # 2 -> 4 as HSDP (2 replicas of 2 shards), recomputing every other layer's activations
        ("sharded", 4, ("--parallel.replicate=2", "--parallel.activation_checkpointing=selective")),
    ],
    ids=["2-to-1", "1-to-2", "2-to-4-hsdp"],
)
def test_a_checkpoint_resumes_on_another_rank_count(request, tmp_path, saved_on, ranks, extra):
    reference = request.getfixturevalue(saved_on)
    checkpoint = reference / "checkpoints" / "step_00000005"
    out = train(ranks, tmp_path / "run", "--resume", str(checkpoint), *extra)
    assert_same_steps(out, reference, first=6)
    meta = json.loads(
        sorted((out / "checkpoints").glob("step_*"))[-1].joinpath("meta.json").read_text()
    )
    assert meta["data"]["consumed"] == 10 * GLOBAL_BATCH


def rank_processes(launcher: subprocess.Popen) -> list[int]:
    """The pids torchrun started (its children: one per rank)."""
    path = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def test_a_sharded_run_killed_at_a_random_step_resumes_bit_identical(tmp_path, sharded):
    kill_at = random.Random().randint(2, 9)
    out = tmp_path / "run"
    launcher = launch(2, out)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= kill_at):
        assert launcher.poll() is None and time.monotonic() < deadline, f"no step {kill_at}"
        time.sleep(0.002)
    os.kill(random.choice(rank_processes(launcher)), signal.SIGKILL)  # one rank dies
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    train(2, out)  # --resume auto
    assert_identical(out, sharded)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--parallel.replicate=3"], "parallel.replicate = 3: the island's 2 ranks"),
        (["--parallel.strategy=zero3"], "parallel.strategy = 'zero3'"),
    ],
)
def test_a_strategy_that_cannot_run_is_refused_before_any_process_group(tmp_path, extra, message):
    # rank 0 of 2 as torchrun would start it, with no rendezvous to join: a refusal must come
    # before the process group, or this would hang waiting for rank 1
    env = {**cli_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    command = [sys.executable, "-m", "ostinato", "train", "--config", str(TINY)]
    command += ["--out", str(tmp_path / "run"), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr


def test_hsdp_replicas_of_a_shard_are_compared_and_a_flipped_bit_repaired(tmp_path):
    """4 ranks as 2 replicas of 2 shards: ranks 1 and 3 hold the same shard. A bit flipped in
    rank 3's shard after step 8 is found by the rank digest guard among the replicas of that
    shard, and rank 3 takes rank 1's values, so the replicas end identical."""
    out = tmp_path / "run"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    overrides = ["train.steps=12", "train.batch_size=2", "checkpoint.every=0", "train.samples=0"]
    overrides += ["parallel.replicate=2", "guards.digest_every=4", "faults.schedule=bitflip@step=8"]
    command = [*run, str(WORKER), str(TINY), str(out), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=cli_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fault bitflip: after step 8, rank 3's" in done.stderr
    assert "guard digest: rank 3's parameters differ from the island's; repaired from rank 1" in (
        done.stderr
    )
    digests = [json.loads((out / f"rank{r}.json").read_text())["digest"] for r in range(4)]
    assert digests[0] == digests[2] and digests[1] == digests[3], digests  # replicas agree
    assert digests[0] != digests[1]  # and shards differ
