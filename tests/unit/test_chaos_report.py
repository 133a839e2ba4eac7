"""The chaos supervisor and its report without a fleet: a fault counts as detected only when a
guard saw it, and the supervisor kills an island the heartbeat or progress guard found stuck."""

import subprocess
import sys
import time

import pytest

from ostinato.faults.spec import Fault, to_json
from ostinato.faults.survival import account_fault, detections
from ostinato.fleet.guards import GuardLog
from ostinato.fleet.local import IslandProcess, LocalFleet
from tests.conftest import TINY

pytestmark = pytest.mark.timeout(60)
NAMES = ["a", "b"]


def crash_of_b(at: float) -> dict:
    return {**to_json(Fault("crash", "b", step=7)), "time": at, "at_step": 7, "at_round": 2}


def row_for(out, fault: dict) -> dict:
    return account_fault(out, NAMES, fault, detections(out, NAMES), fault["time"] - 10)


def test_a_crash_that_no_guard_saw_is_undetected_whatever_the_supervisor_knows(tmp_path):
    struck = time.time()
    # The supervisor's own log of the kill and of the exit it caused is not read: no guard fired.
    row = row_for(tmp_path, crash_of_b(struck))
    assert row["detected_at"] is None and row["guard"] is None
    log = GuardLog(tmp_path)
    log.fire("heartbeat", "a", "dropped", "island a silent")  # another island's: not this crash
    assert row_for(tmp_path, crash_of_b(struck))["detected_at"] is None
    log.fire("progress", "b", "dropped", "island b stalled")  # not a guard a crash can trip
    assert row_for(tmp_path, crash_of_b(struck))["detected_at"] is None
    log.fire("heartbeat", "b", "dropped", "island b silent", silent_s=3.0)
    row = row_for(tmp_path, crash_of_b(struck))
    assert row["guard"] == "heartbeat" and row["detected_at"] == pytest.approx(10, abs=5)


def test_a_stall_is_matched_only_by_the_progress_guard(tmp_path):
    stall = {**to_json(Fault("stall", "b", step=7)), "time": time.time(), "at_step": 7}
    GuardLog(tmp_path).fire("heartbeat", "b", "dropped", "island b silent")
    assert row_for(tmp_path, stall)["detected_at"] is None  # its beats never stopped
    GuardLog(tmp_path).fire("progress", "b", "dropped", "island b stalled", silent_s=8.0)
    assert row_for(tmp_path, stall)["guard"] == "progress"


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.parametrize("guard", ["heartbeat", "progress"])
def test_the_supervisor_kills_an_island_found_stuck_but_not_its_restart(tmp_path, guard):
    fleet = LocalFleet(TINY, tmp_path, NAMES, [], {}, "none", max_restarts=1)
    stuck, restarted = sleeper(), sleeper()
    try:
        fleet.islands = {
            "a": IslandProcess("a", [], stuck, started_at=time.time() - 100),
            "b": IslandProcess("b", [], restarted, started_at=time.time()),
        }
        for name in NAMES:
            GuardLog(tmp_path).fire(guard, name, "dropped", "stuck", silent_s=1.0)
        fleet.tick()
        assert stuck.wait(timeout=10) == -9  # SIGKILLed
        assert restarted.poll() is None
        assert [(e["what"], e["island"]) for e in fleet.log] == [("killed", "a")]
    finally:
        for process in (stuck, restarted):
            process.kill()
            process.wait()
