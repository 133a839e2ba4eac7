"""Goodput: where every island-second of a run went, read from the events the islands append.

Each island process appends to RUN_DIR/events.jsonl, one JSON object per line (unix seconds):
  {"type": "span", "island": "a", "kind": K, "start": t0, "end": t1}   K in SPAN_KINDS
  {"type": "mark", "island": "a", "time": t, "label": "crash injected", "kind": M}   M in MARK_KINDS
A fleet dir holds one such run dir per island (DIR/a/events.jsonl, ...).

Each island's lifetime, from its first to its last event, is cut into non-overlapping pieces:
- where spans overlap, the piece goes to the kind that comes first in PRECEDENCE;
- time under no span is "down" when a fault mark falls in it (ends included) or a recovery span
  follows it directly (the process was dead and restarting), otherwise "idle";
- when a process died, its compute since its work was last kept (a committed exchange in a fleet,
  a checkpoint in a lone run) is "discarded": the restart redoes or replaces it.
goodput = compute seconds / island-seconds (the sum of the islands' lifetimes).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ostinato.curves import draw_loss
from ostinato.errors import BadInput
from ostinato.jsonl import read_jsonl

SPAN_KINDS = (
    "compute",
    "exchange",
    "waiting",
    "checkpoint",
    "evaluate",
    "recovery",
    "discarded",
)
# Losses hide what they overlap: steps later discarded were computed, but not kept; a checkpoint
# or exchange stall counts as that stall even if a waiting span is open around it.
PRECEDENCE = ("recovery", "discarded", "checkpoint", "evaluate", "exchange", "waiting", "compute")
CATEGORIES = (*SPAN_KINDS, "idle", "down")
MARK_KINDS = ("fault", "detect", "recover")

_COLOURS = {
    "compute": "#3b75af",
    "exchange": "#8fbbd9",
    "waiting": "#f2c45a",
    "checkpoint": "#9467bd",
    "evaluate": "#bcbd22",
    "recovery": "#e377c2",
    "discarded": "#8c564b",
    "idle": "#e6e6e6",
    "down": "#404040",
}
_MARK_COLOURS = {"fault": "#d62728", "detect": "#ff7f0e", "recover": "#2ca02c"}


@dataclass
class Goodput:
    wall_s: float  # first to last event of the whole run
    seconds: dict[str, float]  # CATEGORIES -> seconds summed over islands
    goodput: float  # compute / island-seconds

    @property
    def island_s(self) -> float:
        return sum(self.seconds.values())

    def to_json(self) -> dict:
        return {
            "wall_s": self.wall_s,
            "island_s": self.island_s,
            "goodput": self.goodput,
            "seconds": dict(self.seconds),
        }


def read_events(run_or_fleet_dir: str | Path) -> list[dict]:
    """Events of a run dir or of every island dir in a fleet dir, in time order. A line that does
    not parse is skipped (ostinato.jsonl): a SIGKILL can tear the line being written."""
    root = Path(run_or_fleet_dir)
    files = _event_files(root)
    if not files:
        raise BadInput(
            f"no events.jsonl in {root} or in its island directories: not a run or fleet "
            "directory, or its run logged nothing"
        )
    events = []
    for path in files:
        for event in read_jsonl(path):
            event.setdefault("island", path.parent.name)  # a lone trainer run names none
            events.append(_timed(event, path))
    return sorted(events, key=lambda e: _times(e)[0])


def _timed(event: dict, path: Path) -> dict:
    """The event, if it carries the times its type needs; a bad writer is named, not a KeyError."""
    keys = {"span": ("start", "end"), "mark": ("time",)}.get(event.get("type"))
    if keys is None or not all(isinstance(event.get(k), int | float) for k in keys):
        raise BadInput(f"{path}: {event} is neither a span (start, end) nor a mark (time)")
    return event


def _event_files(root: Path) -> list[Path]:
    candidates = [root / "events.jsonl", *sorted(root.glob("*/events.jsonl"))]
    return [p for p in candidates if p.is_file()]


def account(events: list[dict]) -> Goodput:
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for spans, marks in _by_island(events).values():
        for start, end, category in _pieces(spans, marks):
            seconds[category] += end - start
    times = [t for event in events for t in _times(event)]
    wall = max(times) - min(times) if times else 0.0
    total = sum(seconds.values())
    return Goodput(wall, seconds, seconds["compute"] / total if total > 0 else 0.0)


def render_table(goodput: Goodput, console: Console) -> None:
    table = Table(title=f"goodput {goodput.goodput:.1%} (wall {goodput.wall_s:.1f} s)")
    table.add_column("category")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = goodput.island_s
    for category in CATEGORIES:
        value = goodput.seconds[category]
        table.add_row(category, f"{value:.1f}", f"{value / total:.1%}" if total else "-")
    table.add_section()
    table.add_row("island-seconds", f"{total:.1f}", "100.0%" if total else "-")
    console.print(table)


def draw_timeline(events: list[dict], path_png: str | Path, title: str) -> None:
    """Islands as lanes, pieces coloured by category, fault marks red with labels, detections
    orange, recoveries green; x in seconds from the first event."""
    # Lazy: matplotlib is slow to import and only reports need it. Figure draws with Agg and
    # leaves pyplot's global backend alone.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lanes = _by_island(events)
    names = sorted(lanes)
    t0 = min((t for event in events for t in _times(event)), default=0.0)
    fig = Figure(figsize=(10, 1.5 + 0.6 * len(names)), layout="constrained")
    ax = fig.subplots()
    shown: set[str] = set()
    for row, name in enumerate(names):
        spans, marks = lanes[name]
        pieces = _pieces(spans, marks)
        for category in CATEGORIES:
            bars = [(s - t0, e - s) for s, e, c in pieces if c == category]
            if bars:
                ax.broken_barh(bars, (row - 0.35, 0.7), facecolors=_COLOURS[category])
                shown.add(category)
        for mark in marks:
            x = mark["time"] - t0
            ax.vlines(x, row - 0.45, row + 0.45, colors=_MARK_COLOURS[mark["kind"]], linewidth=1.5)
            if mark["kind"] == "fault":
                ax.text(x, row - 0.47, mark.get("label", ""), color=_MARK_COLOURS["fault"],
                        fontsize=7, rotation=20, ha="left", va="bottom")  # fmt: skip
            shown.add(mark["kind"])
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.4, -0.8)  # first island on top, room for fault labels
    ax.set_xlabel("seconds from start")
    ax.set_title(title)
    handles = [Patch(color=_COLOURS[c], label=c) for c in CATEGORIES if c in shown]
    handles += [Line2D([], [], color=_MARK_COLOURS[k], label=k) for k in MARK_KINDS if k in shown]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(path_png, dpi=110)


def _times(event: dict) -> tuple[float, ...]:
    return (event["start"], event["end"]) if event["type"] == "span" else (event["time"],)


def _by_island(events: list[dict]) -> dict[str, tuple[list[dict], list[dict]]]:
    """island -> (spans, marks), each event checked so a bad writer is named, not miscounted."""
    lanes: dict[str, tuple[list[dict], list[dict]]] = {}
    for event in events:
        spans, marks = lanes.setdefault(event["island"], ([], []))
        if event.get("type") == "span":
            if event["kind"] not in SPAN_KINDS:
                raise ValueError(f"span kind {event['kind']!r} unknown; allowed: {SPAN_KINDS}")
            if event["end"] < event["start"]:
                raise ValueError(f"span ends before it starts: {event}")
            spans.append(event)
        elif event.get("type") == "mark":
            if event["kind"] not in MARK_KINDS:
                raise ValueError(f"mark kind {event['kind']!r} unknown; allowed: {MARK_KINDS}")
            marks.append(event)
        else:
            raise ValueError(f"event type must be span or mark: {event}")
    return lanes


def _pieces(spans: list[dict], marks: list[dict]) -> list[tuple[float, float, str]]:
    """One island's lifetime as (start, end, category), in order, without overlaps: a sweep over
    span edges keeps a count of open spans per kind; the open kind first in PRECEDENCE wins."""
    times = [t for event in spans + marks for t in _times(event)]
    edges = sorted(
        (t, delta, s["kind"]) for s in spans for t, delta in ((s["start"], 1), (s["end"], -1))
    )
    open_kinds: Counter[str] = Counter()
    pieces: list[tuple[float, float, str | None]] = []
    previous = min(times)
    for time, delta, kind in edges:
        if time > previous:
            top = next((k for k in PRECEDENCE if open_kinds[k] > 0), None)
            pieces.append((previous, time, top))
            previous = time
        open_kinds[kind] += delta
    if max(times) > previous:
        pieces.append((previous, max(times), None))
    return _merge(_lost_to_deaths(_name_gaps(_merge(pieces), marks)))


def _merge(pieces):
    merged = []
    for start, end, category in pieces:
        if merged and merged[-1][2] == category and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end, category)
        else:
            merged.append((start, end, category))
    return merged


def _restart_follows(pieces, i: int) -> bool:
    """Whether a restart's recovery directly follows piece i: the process before it died."""
    return i + 1 < len(pieces) and pieces[i + 1][2] == "recovery"


def _name_gaps(pieces, marks) -> list[tuple[float, float, str]]:
    faults = [m["time"] for m in marks if m["kind"] == "fault"]
    named = []
    for i, (start, end, category) in enumerate(pieces):
        if category is None:
            struck = any(start <= t <= end for t in faults)
            category = "down" if _restart_follows(pieces, i) or struck else "idle"
        named.append((start, end, category))
    return named


def restarts(events: list[dict]) -> dict[str, list[float]]:
    """Per island, the seconds each death cost it: from the last event of the dead process
    (a hang's stop included) to the end of its restart's recovery."""
    found: dict[str, list[float]] = {}
    for island, (spans, marks) in _by_island(events).items():
        pieces = _pieces(spans, marks) if spans else []
        found[island] = [
            (end - start) + (pieces[i + 1][1] - pieces[i + 1][0])
            for i, (start, end, category) in enumerate(pieces)
            if category == "down" and _restart_follows(pieces, i)
        ]
    return found


def _lost_to_deaths(pieces) -> list[tuple[float, float, str]]:
    """Compute that a process did after its work was last kept, when the process then died (a
    down gap that a restart's recovery ends), is discarded: it died with the process. In a fleet
    only a committed exchange keeps an island's steps (a restarted island heals from a donor);
    a lone run keeps them with a checkpoint."""
    keep = "exchange" if any(c == "exchange" for _, _, c in pieces) else "checkpoint"
    out: list[tuple[float, float, str]] = []
    kept_until = 0  # pieces before this index of `out` are safe
    for i, (start, end, category) in enumerate(pieces):
        died = category == "down" and _restart_follows(pieces, i)
        if died:
            out[kept_until:] = [
                (s, e, "discarded" if c == "compute" else c) for s, e, c in out[kept_until:]
            ]
        out.append((start, end, category))
        if category == keep or died:
            kept_until = len(out)
    return out


def summarize(run_or_fleet_dir: str | Path, title: str) -> Goodput:
    """Account a finished run: goodput.json, timeline.png and its learning curve, loss.png
    (ostinato.curves), are kept in its directory."""
    folder = Path(run_or_fleet_dir)
    # A fleet whose islands all failed before logging anything still ends with their exit codes,
    # not with a missing file: its account is empty (no time, goodput 0).
    events = read_events(folder) if _event_files(folder) else []
    goodput = account(events)
    (folder / "goodput.json").write_text(json.dumps(goodput.to_json(), indent=1))
    draw_timeline(events, folder / "timeline.png", title)
    draw_loss(folder, folder / "loss.png", title)
    return goodput
