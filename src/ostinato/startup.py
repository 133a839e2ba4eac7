"""Where the seconds of a start go, so a restart's length is a measurement, not a guess.

Each process marks the end of each phase: `process` (when the kernel started it, from
/proc/self/stat on Linux; for a warm spare, when it was given its island), `imports` (the trainer is entered), `data` (documents, tokenizer and
tokens), `model` (built and initialised), `checkpoint` (resumed from), `join` (admitted by the
fleet), `heal` (the fleet state received from a donor), `first_step` (its first inner step
done). The main rank appends them, once per process, to startup.jsonl in the run directory;
bench/restart.py reads them.
"""

from __future__ import annotations

import os
import time
from typing import Any

STARTUP_FILE = "startup.jsonl"
# Set when a warm spare (ostinato.warm) becomes an island: its start as that island, which is
# then the `process` mark (its imports were done before anyone needed it).
_taken_as_spare_at: float | None = None


def taken_as_spare() -> None:
    global _taken_as_spare_at
    _taken_as_spare_at = time.time()


PHASES = ("process", "imports", "data", "model", "checkpoint", "join", "heal", "first_step")


def process_start_time() -> float | None:
    """When the kernel started this process (epoch seconds, to a clock tick), or None off Linux.

    /proc/self/stat gives the start in ticks since boot; the boot clock read now converts it
    (the boot time in /proc/stat is whole seconds, too coarse for a start of a few seconds)."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupClock:
    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.spare = _taken_as_spare_at is not None
        started = _taken_as_spare_at if self.spare else process_start_time()
        if started is not None:
            self.marks["process"] = started
        self.written = False

    def mark(self, phase: str, at: float | None = None) -> None:
        assert phase in PHASES, phase
        self.marks[phase] = time.time() if at is None else at

    def record(self) -> dict[str, Any]:
        """The marks, and each phase's seconds since the mark before it."""
        seen = [p for p in PHASES if p in self.marks]
        seconds = {
            later: self.marks[later] - self.marks[earlier]
            for earlier, later in zip(seen, seen[1:], strict=False)
        }
        return {"marks": dict(self.marks), "seconds": seconds, "spare": self.spare}
