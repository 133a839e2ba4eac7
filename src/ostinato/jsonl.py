"""One tolerant reader for every JSON-lines file the project writes (metrics, events, rounds,
guards, chaos logs): a SIGKILL can tear the line being written, and a run must still resume.

The matching writer, `append_jsonl`, starts its record on a fresh line when the file ends in a
torn one, so the first record a restarted process writes is not glued to its predecessor's
fragment (and lost with it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order. A line that does not parse as a JSON object
    is skipped: the last one may be torn by a kill, or still being written by another process
    (quietly skipped: the next read sees it whole); any other is corrupt (skipped, warned)."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _object_or_none(line)
        if row is not None:
            rows.append(row)
        elif number == len(lines) and not text.endswith("\n"):
            log.debug("%s: last line %d is unfinished (torn by a kill?): skipped", path, number)
        else:
            log.warning("%s: line %d is not a JSON object: skipped", path, number)
    return rows


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one line, with a single write (O_APPEND), after a newline of its own
    when the file ends in a torn line."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab+") as f:
        if f.tell() > 0:  # append mode opens at the end
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)  # appended at the end whatever the read position (O_APPEND)


def _object_or_none(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
