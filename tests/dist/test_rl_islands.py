"""Rollout islands as processes beside the RL trainer, struck by faults and running ahead of
it. Here with the other multi-process tests (one at a time, tests/conftest.py), so that they
do not share the 2 cores with a fleet under a storm."""

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import cli_env, run_cli
from tests.integration.test_rl import read_jsonl, recipe, run_recipe

pytestmark = pytest.mark.timeout(300)


def test_rollout_islands_survive_a_crash_and_a_hang(sft_run, tmp_path):
    """Under `ostinato chaos`, island r0 is killed (SIGKILL) and r1 stopped (SIGSTOP)
    mid-generation: the trainer sees the exit and the silence, counts the answers in flight as
    lost, has them generated again, restarts both islands, and every update still trains on
    rollouts of its own policy. The survival table names the guard that saw each fault."""
    config = recipe(tmp_path, sft_run, steps=5, eval_every=5, rollout_islands=2)
    out = tmp_path / "out"
    done = run_cli(
        "chaos", "--config", str(config), "--out", str(out), "--rl.rollout_timeout_s=5",
        "--faults", "crash@island=r0,step=2; hang@island=r1,step=4", timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "chaos.json").read_text())
    guards = {(f["kind"], f["island"], f["step"]): f["guard"] for f in report["faults"]}
    assert guards == {("crash", "r0", 2): "exit", ("hang", "r1", 4): "rollout timeout"}
    hang = next(f for f in report["faults"] if f["kind"] == "hang")
    # no earlier than its timeout (both times are rounded to the millisecond in chaos.json)
    assert hang["detected_at"] - hang["injected_at"] >= 5.0 - 0.002
    assert "survival table" in done.stdout
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["staleness"] == {"0": 8} for r in records)  # re-synced before any new work
    last = records[-1]
    assert last["island_restarts"] == 2
    assert last["lost_rollouts"] >= 8  # at least each struck island's own slice of 4
    # with both islands down at once (a slow restart on a loaded machine) the trainer
    # generates a lost slice itself: whole slices of 4 answers, never part of one
    assert last["local_rollouts"] % 4 == 0
    joins = (out / "islands" / "r0.log").read_text().count("joined")
    assert joins == 2  # the restarted r0 joined again


def test_stale_rollouts_stay_within_max_staleness(sft_run, tmp_path):
    done = run_recipe(
        tmp_path, sft_run, steps=5, eval_every=5, rollout_islands=2, max_staleness=1,
        weight_push="int4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    seen = {k for r in records for k in r["staleness"]}
    assert seen <= {"0", "1"}
    # the islands ran ahead of the trainer (its next update's work is out before the update):
    # a rollout one version old is corrected by its importance weight, truncated at the cap
    assert "1" in seen
    weights = [r["importance_weight"] for r in records if r["staleness"].get("1")]
    assert all(0 < w <= 2.0 for w in weights) and any(w != 1.0 for w in weights)
    # int4 deltas after the first whole copy: 1/8 of fp32, plus a 4-byte scale per 128 values
    pushed = [r["weight_push_bytes"] for r in records if "weight_push_bytes" in r]
    assert pushed[0] > 7 * max(pushed[1:])


def test_a_hand_started_island_that_dies_is_seen_by_its_heartbeat(sft_run, tmp_path):
    """`rl.spawn = false`: the trainer did not start the island and has no process to watch.
    The island, started by hand as on another host, is killed (SIGKILL) mid-generation; its
    heartbeat stops and the trainer loses it within rl.heartbeat_timeout_s, long before the
    rollout timeout (600 s, longer than this test may run), then generates the lost answers
    itself, since nobody restarts the island here."""
    config = recipe(tmp_path, sft_run, steps=4, eval_every=4, rollout_islands=1, spawn=False)
    out = tmp_path / "out"
    env = dict(cli_env(), OSTINATO_FLEET_TOKEN="hand-started")
    command = [sys.executable, "-m", "ostinato", "chaos", "--config", str(config)]
    command += ["--out", str(out), "--rl.rollout_timeout_s=600", "--rl.heartbeat_timeout_s=2"]
    trainer = subprocess.Popen(
        [*command, "--faults", "crash@island=r0,step=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    island = None
    try:
        for line in trainer.stderr:
            if "waiting for rollout islands at" in line:
                address = line.rsplit(" at ", 1)[1].split()[0]
                break
        else:
            raise AssertionError("the trainer never said where it waits for islands")
        island = subprocess.Popen(
            [sys.executable, "-m", "ostinato", "rl", "rollout", "--coordinator", address,
             "--island", "r0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        stdout, stderr = trainer.communicate(timeout=240)
    finally:
        for proc in (trainer, island):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert trainer.returncode == 0, stderr[-3000:]
    assert island.wait(10) == -signal.SIGKILL  # the scripted fault: it killed itself
    report = json.loads((out / "chaos.json").read_text())
    [fault] = report["faults"]
    assert (fault["kind"], fault["guard"]) == ("crash", "heartbeat")
    # Far before the rollout timeout. Not much before the heartbeat timeout: the clock runs
    # from the last beat the trainer read, which is at most one beat (0.4 s) and one read
    # interval (0.25 s) older than the fault (times rounded to the millisecond).
    waited = fault["detected_at"] - fault["injected_at"]
    assert 2.0 - 0.4 - 0.25 - 0.002 <= waited < 60
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["lost_rollouts"] >= 1 and records[-1]["local_rollouts"] >= 1
