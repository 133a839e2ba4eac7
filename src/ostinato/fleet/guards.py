"""Guards across islands: the checks that turn a silent fault of one island into a visible one.

Pure decisions (which pseudo-gradient is an outlier, which digest is the fleet's, who is slow)
plus the fleet's guard log, DIR/guards.jsonl: one JSON object per firing, read by `ostinato
chaos` to match every injected fault with the guard that caught it.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ostinato.jsonl import append_jsonl, read_jsonl

log = logging.getLogger("ostinato")
GUARDS_FILE = "guards.jsonl"


def median_of_others(values: Sequence[float], index: int) -> float | None:
    others = [v for i, v in enumerate(values) if i != index and math.isfinite(v)]
    return statistics.median(others) if others else None


def pseudo_gradient_outliers(norms: Sequence[float], ratio: float) -> list[int]:
    """Indices of pseudo-gradients to leave out of a round's average.

    A non-finite norm is always out. A norm more than `ratio` times the median of the others' is
    out too: a flipped exponent bit makes one value ~1e36, which an average would hand to every
    island. Every member runs this on the same gathered bytes, so all decide alike.
    """
    out = []
    for i, norm in enumerate(norms):
        others = median_of_others(norms, i)
        big = ratio > 0 and others is not None and others > 0 and norm > ratio * others
        if not math.isfinite(norm) or big:
            out.append(i)
    return out


def fleet_digest(digests: dict[str, str], order: Sequence[str], suspects: Sequence[str]) -> str:
    """The digest the fleet keeps when members disagree.

    The one held by most members that were not suspects (their pseudo-gradient was left out),
    then by most members, then the one of the member earliest in `order` (the last round's
    members: its first is the donor).
    """
    rank = {name: i for i, name in enumerate(order)}

    def score(digest: str) -> tuple[int, int, int]:
        holders = [m for m, d in digests.items() if d == digest]
        trusted = sum(m not in suspects for m in holders)
        first = min(rank.get(m, len(order)) for m in holders)
        return trusted, len(holders), -first

    return max(sorted(set(digests.values())), key=score)


def outliers_above_median(values: dict[str, float], ratio: float, floor: float = 0.0) -> dict:
    """{name: times the others' median} for each value above `ratio` times that median (and
    above `floor`): slow exchanges, slow steps."""
    names = list(values)
    numbers = [values[n] for n in names]
    found = {}
    for i, name in enumerate(names):
        others = median_of_others(numbers, i)
        if ratio > 0 and others and numbers[i] > max(ratio * others, floor):
            found[name] = numbers[i] / others
    return found


class GuardLog:
    """Appends each guard firing to DIR/guards.jsonl and to the log."""

    def __init__(self, out: Path | None):
        self.path = out / GUARDS_FILE if out is not None else None

    def fire(self, guard: str, island: str, action: str, message: str, **extra: Any) -> None:
        log.warning("guard %s: %s", guard, message)
        if self.path is None:
            return
        record = {"time": time.time(), "guard": guard, "island": island, "action": action}
        record.update(message=message, **extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, record)


def read_guard_log(out: Path) -> list[dict[str, Any]]:
    path = out / GUARDS_FILE
    if not path.exists():
        return []
    return read_jsonl(path)  # a line torn by a kill, or still being written, is skipped
