"""A line torn by a kill never stops a reader: one tolerant reader serves every JSON-lines file,
and the writer puts the next record on a line of its own."""

from __future__ import annotations

import json
import logging

import pytest

from ostinato.fleet.coordinator import Coordinator
from ostinato.fleet.guards import GUARDS_FILE, GuardLog, read_guard_log
from ostinato.goodput import account, read_events
from ostinato.jsonl import append_jsonl, read_jsonl
from ostinato.plan.calibrate import calibrate_run
from ostinato.train.metrics import EventLog, read_metrics
from tests.unit.test_coordinator import Island, commit_round, fleet_cfg
from tests.unit.test_plan_calibrate import write_fleet

pytestmark = pytest.mark.timeout(60)

TORN = '{"round": 9, "memb'  # what a SIGKILL mid-write leaves: no closing brace, no newline


def write(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_a_torn_last_line_is_skipped_quietly_and_a_corrupt_one_is_named(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    write(path, [{"a": 1}, {"a": 2}], tail=TORN)
    with caplog.at_level(logging.DEBUG, logger="ostinato.jsonl"):
        assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # inside the file, a line that is not an object is corruption: skipped, with a warning
    path.write_text('{"a": 1}\n[1, 2]\nnot json\n\n{"a": 2}\n')
    caplog.clear()
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "line 2" in warned[0] and "line 3" in warned[1]


def test_the_next_record_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    path = tmp_path / "x.jsonl"
    append_jsonl(path, {"a": 1})  # a new file
    assert path.read_text() == '{"a": 1}\n'
    with path.open("a") as f:
        f.write(TORN)
    append_jsonl(path, {"a": 2})
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert path.read_text().splitlines()[1] == TORN  # left as it was, never glued to


def test_metrics_guards_and_events_readers_skip_a_torn_last_line(tmp_path):
    write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}], tail='{"step": 2, "lo')
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]

    GuardLog(tmp_path).fire("heartbeat", "b", "dropped", "island b is silent")
    with (tmp_path / GUARDS_FILE).open("a") as f:
        f.write('{"time": 1.0, "gua')
    GuardLog(tmp_path).fire("digest", "c", "healed", "island c diverged")
    assert [g["guard"] for g in read_guard_log(tmp_path)] == ["heartbeat", "digest"]

    events = EventLog(tmp_path / "a" / "events.jsonl", "a")
    (tmp_path / "a").mkdir()
    events.span("compute", 0.0, 2.0)
    with events.path.open("a") as f:
        f.write('{"type": "span", "island": "a", "ki')  # killed mid-write
    events.span("recovery", 5.0, 6.0)  # the restarted process
    spans = [(e["kind"], e["start"]) for e in read_events(tmp_path)]
    assert spans == [("compute", 0.0), ("recovery", 5.0)]
    # 0-2 compute, 2-5 down (a restart's recovery follows), 5-6 recovery; the compute since
    # the last checkpoint died with the process: discarded
    assert account(read_events(tmp_path)).seconds["discarded"] == pytest.approx(2.0)


def test_calibration_reads_a_fleet_whose_files_end_in_torn_lines(tmp_path):
    write_fleet(tmp_path, with_goodput=False)
    whole = calibrate_run(str(tmp_path))
    for path in [tmp_path / "rounds.jsonl", *tmp_path.glob("*/metrics.jsonl")]:
        with path.open("a") as f:
            f.write('{"round": 20, "atte')
    assert calibrate_run(str(tmp_path)) == whole  # the torn lines add nothing and stop nothing


def test_calibration_of_a_fleet_that_logged_no_events(tmp_path):
    """A goodput.json written from no events records no time: it is no measurement, and the
    run is measured from its metrics (before: a division by zero)."""
    write_fleet(tmp_path, with_goodput=False)
    from_metrics = calibrate_run(str(tmp_path))
    for name in "abc":
        (tmp_path / name / "events.jsonl").write_text("")
    empty = {"wall_s": 0.0, "island_s": 0.0, "goodput": 0.0, "seconds": {}}
    (tmp_path / "goodput.json").write_text(json.dumps(empty))
    assert calibrate_run(str(tmp_path)) == from_metrics


def test_events_without_times_are_named_not_a_key_error(tmp_path):
    write(tmp_path / "events.jsonl", [{"type": "span", "kind": "compute", "start": 0.0}])
    with pytest.raises(ValueError, match="neither a span"):
        read_events(tmp_path)


def test_a_coordinator_restarts_on_a_torn_rounds_log_and_logs_on(tmp_path):
    rounds = [{"round": n, "attempt": 0, "members": ["a", "b"]} for n in (1, 2)]
    write(tmp_path / "rounds.jsonl", rounds, tail=TORN)
    second = Coordinator("127.0.0.1:0", fleet_cfg(), tmp_path)
    second.slow_tick_s = 0.0
    assert second.last_committed == 2 and second.round.number == 3
    assert second.last_members == ["a", "b"]
    a, b = Island(second, "a"), Island(second, "b")
    for island in (a, b):
        assert island.knock(second, round_have=2, reconnect=True)["role"] == "member"
    commit_round(second, [a, b], 3)
    third = Coordinator("127.0.0.1:0", fleet_cfg(), tmp_path)  # restarts again
    assert third.last_committed == 3 and third.round.number == 4
    assert [r["round"] for r in read_jsonl(tmp_path / "rounds.jsonl")] == [1, 2, 3]
