"""Goodput: hand-made events with overlaps, gaps, crashes and several islands, to the second."""

import json

import pytest
from rich.console import Console

from ostinato.goodput import CATEGORIES, account, draw_timeline, read_events, render_table

pytestmark = pytest.mark.timeout(30)

T = 1_700_000_000  # unix seconds, as time.time() writes them


def span(island, kind, start, end):
    return {"type": "span", "island": island, "kind": kind, "start": T + start, "end": T + end}


def mark(island, kind, time, label):
    return {"type": "mark", "island": island, "time": T + time, "label": label, "kind": kind}


# a: overlaps of every kind and an idle gap (13-15), lifetime 0-27.
# b: crashed at 6, down until its restart's recovery span at 9, lifetime 0-20.
# c: joined late, lifetime 10-20.
FLEET = [
    span("a", "compute", 0, 10),
    span("a", "exchange", 8, 12),  # exchange beats compute over 8-10
    span("a", "waiting", 12, 13),
    span("a", "compute", 15, 25),
    span("a", "checkpoint", 18, 19),  # beats compute
    span("a", "discarded", 20, 25),  # beats compute
    span("a", "recovery", 24, 27),  # beats discarded over 24-25
    span("b", "compute", 0, 5),
    mark("b", "fault", 6, "crash injected"),
    mark("b", "detect", 7, "heartbeat timeout"),
    span("b", "recovery", 9, 11),
    mark("b", "recover", 11, "healed from a"),
    span("b", "compute", 11, 20),
    span("c", "compute", 10, 20),
    span("c", "evaluate", 19, 20),  # an evaluation during training beats compute
]
# b's compute 0-5 died with it (it never exchanged): discarded.
EXPECTED = {"compute": 12 + 9 + 9, "exchange": 4, "waiting": 1, "checkpoint": 1, "evaluate": 1,
            "recovery": 3 + 2, "discarded": 4 + 5, "idle": 2, "down": 4}  # fmt: skip


def test_fleet_seconds_are_exact():
    goodput = account(FLEET)
    assert goodput.seconds == pytest.approx(EXPECTED)
    assert list(goodput.seconds) == list(CATEGORIES)
    assert goodput.island_s == pytest.approx(27 + 20 + 10)
    assert goodput.wall_s == pytest.approx(27)
    assert goodput.goodput == pytest.approx(30 / 57)
    assert json.loads(json.dumps(goodput.to_json()))["goodput"] == pytest.approx(30 / 57)


def test_order_of_events_does_not_matter():
    assert account(FLEET[::-1]).seconds == pytest.approx(EXPECTED)


def test_gaps_are_down_after_a_fault_or_before_a_restart_else_idle():
    events = [
        span("a", "compute", 0, 4),
        span("a", "recovery", 6, 7),  # no mark: the gap before a restart is still down
        span("a", "compute", 7, 9),
        span("a", "compute", 10, 11),  # 9-10: idle
        mark("a", "fault", 13, "hang injected"),  # never came back: 11-13 down
        span("b", "compute", 0, 3),
        span("b", "compute", 0, 3),  # duplicates are not counted twice
    ]
    seconds = account(events).seconds
    assert seconds["down"] == pytest.approx(2 + 2)
    assert seconds["idle"] == pytest.approx(1)
    assert seconds["compute"] == pytest.approx(2 + 1 + 3)
    assert seconds["discarded"] == pytest.approx(4)  # a died before any checkpoint
    assert seconds["recovery"] == pytest.approx(1)


def test_a_dead_process_loses_its_work_since_it_was_last_kept():
    fleet_island = [
        span("a", "compute", 0, 4),
        span("a", "exchange", 4, 5),  # round committed: 0-4 kept
        span("a", "compute", 5, 8),
        span("a", "checkpoint", 8, 9),  # a checkpoint does not keep a fleet island's steps
        span("a", "compute", 9, 10),
        mark("a", "fault", 10, "crash injected"),
        span("a", "recovery", 12, 13),
        span("a", "compute", 13, 15),
    ]
    seconds = account(fleet_island).seconds
    assert seconds["compute"] == pytest.approx(4 + 2)
    assert seconds["discarded"] == pytest.approx(3 + 1)
    lone_run = [
        span("r", "compute", 0, 4),
        span("r", "checkpoint", 4, 5),  # alone, a checkpoint keeps 0-4
        span("r", "compute", 5, 8),
        span("r", "recovery", 9, 10),  # the restart: 8-9 down
        span("r", "compute", 10, 12),
        mark("r", "fault", 13, "slow injected"),  # struck, but no restart: nothing lost
        span("r", "compute", 14, 15),
    ]
    seconds = account(lone_run).seconds
    assert seconds["compute"] == pytest.approx(4 + 2 + 1)
    assert seconds["discarded"] == pytest.approx(3)
    assert seconds["down"] == pytest.approx(1 + 2)


def test_no_events_and_bad_events():
    assert account([]).goodput == 0.0
    with pytest.raises(ValueError, match="span kind 'lunch' unknown"):
        account([span("a", "lunch", 0, 1)])
    with pytest.raises(ValueError, match="ends before it starts"):
        account([span("a", "compute", 2, 1)])
    with pytest.raises(ValueError, match="mark kind 'oops' unknown"):
        account([mark("a", "oops", 1, "?")])


def write_lines(path, events, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)


def test_read_fleet_and_single_run_dirs(tmp_path):
    by_island = {}
    for event in FLEET:
        by_island.setdefault(event["island"], []).append(event)
    for island, events in by_island.items():
        # a SIGKILL mid-write leaves a torn line; the restarted process appends after it
        write_lines(tmp_path / "fleet" / island / "events.jsonl", events, tail='{"type": "sp')
    events = read_events(tmp_path / "fleet")
    assert len(events) == len(FLEET)
    assert account(events).seconds == pytest.approx(EXPECTED)

    run = tmp_path / "run"
    write_lines(
        run / "events.jsonl",
        [{k: v for k, v in span("x", "compute", 0, 2).items() if k != "island"}],
    )
    assert read_events(run)[0]["island"] == "run"
    with pytest.raises(ValueError, match="no events.jsonl"):  # BadInput: exit 2, one line
        read_events(tmp_path / "empty")


def test_table_names_every_category():
    console = Console(record=True, width=100)
    render_table(account(FLEET), console)
    text = console.export_text()
    assert all(category in text for category in CATEGORIES)
    assert "goodput 52.6%" in text and "30.0" in text


def test_timeline_png_is_a_valid_image(tmp_path):
    from matplotlib.image import imread

    path = tmp_path / "timeline.png"
    draw_timeline(FLEET, path, "three islands, one crash")
    assert path.stat().st_size > 1000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 500
