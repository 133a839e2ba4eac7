"""One tolerant reader for every JSON-lines file the project writes (metrics, events, rounds,
guards, chaos logs): a SIGKILL can tear the line being written, and a run must still resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order. A line that does not parse as a JSON object
    is skipped with a warning naming the file and line: the last one may be torn by a kill."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s line %d is not a JSON object (torn by a kill?): skipped", path, number)
    return rows
