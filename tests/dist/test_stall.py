"""`stall` on a real local fleet: island b's step blocks after its forward pass while its process
and heartbeats live on; the coordinator's progress guard sees its step stand still, the
supervisor restarts it, and the fleet ends in agreement. A `hang` (SIGSTOP) on island a in the
same run is still caught by the heartbeat guard."""

import json

import pytest

from tests.conftest import TINY
from tests.dist.fleet_helpers import Running, final_digests, ostinato, rounds

pytestmark = pytest.mark.timeout(600)

# Step budget: rounds of 5 inner steps, 12 rounds. The progress timeout (11 s) is far above a
# tiny step on a loaded 2-core machine (well under 1 s, checkpoint included) and above the
# heartbeat timeout (3 s) and the exchange deadline (5 + 5 s), as the config requires, so only
# the stall trips it.
PROGRESS_TIMEOUT_S = 11
FLEET = [
    "--train.steps=60",
    "--fleet.budget=steps:5",
    "--checkpoint.every=5",
    "--fleet.heartbeat_s=0.2",
    "--fleet.heartbeat_timeout_s=3",
    f"--fleet.progress_timeout_s={PROGRESS_TIMEOUT_S}",
    "--fleet.timeout_s=5",
    "--fleet.grace_s=2",
    "--train.eval_problems=0",
    "--train.samples=0",
]
FAULTS = "stall@island=b,step=10; hang@island=a,round=6"


def test_a_stalled_step_is_caught_by_the_progress_guard_and_the_island_restarts(tmp_path):
    out = tmp_path / "chaos"
    command = ostinato("chaos", "--config", str(TINY), "--out", str(out), "--islands", "2")
    run = Running([*command, "--faults", FAULTS, *FLEET])
    assert run.wait(540) == 0, run.output[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    caught = {row["kind"]: row for row in report["faults"]}
    assert set(caught) == {"stall", "hang"}, report["faults"]
    stall, hang = caught["stall"], caught["hang"]
    assert stall["island"] == "b" and stall["step"] == 10 and stall["guard"] == "progress"
    # no earlier than the progress timeout after the stall (less the 0.5 s the matcher allows)
    assert stall["detected_at"] - stall["injected_at"] >= PROGRESS_TIMEOUT_S - 0.5, stall
    assert hang["island"] == "a" and hang["guard"] == "heartbeat", hang
    killed = [e["island"] for e in report["supervisor"] if e["what"] == "killed"]
    restarted = [e["island"] for e in report["supervisor"] if e["what"] == "restarted"]
    assert "b" in killed and "b" in restarted and "a" in killed and "a" in restarted
    assert "fault stall: step 10 blocks" in run.output
    guards = [json.loads(line) for line in (out / "guards.jsonl").read_text().splitlines()]
    progress = [g for g in guards if g["guard"] == "progress"]
    assert [g["island"] for g in progress] == ["b"], progress  # no healthy island taken for one
    assert progress[0]["silent_s"] >= PROGRESS_TIMEOUT_S
    assert report["parameters_identical"] is True
    assert len(set(final_digests(out, ["a", "b"]).values())) == 1
    assert [r["round"] for r in rounds(out)] == list(range(1, 13))
