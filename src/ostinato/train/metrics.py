"""Per-step metrics: one JSON line per step, a live progress bar or plain lines, TensorBoard if asked."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ostinato.jsonl import append_jsonl, read_jsonl


class MetricsLog:
    """Appends one object per step to metrics.jsonl; floats keep full precision (repr)."""

    def __init__(self, path: Path, resume_step: int, tensorboard: bool = False):
        self.path = path
        self._drop_after(resume_step)
        self._file = path.open("a")
        self._tensorboard = _tensorboard_writer(path.parent) if tensorboard else None

    def _drop_after(self, step: int) -> None:
        """Steps logged after the checkpoint we resume from are redone, so their lines go."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and _complete_step(line) is not None and _complete_step(line) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float | int):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class EventLog:
    """Spans of wall-clock time by kind, for goodput accounting (ostinato.goodput)."""

    def __init__(self, path: Path, island: str):
        self.path, self.island = path, island

    def span(self, kind: str, start: float, end: float) -> None:
        self._write(
            {"type": "span", "island": self.island, "kind": kind, "start": start, "end": end}
        )

    def mark(self, kind: str, label: str, at: float) -> None:
        self._write(
            {"type": "mark", "island": self.island, "kind": kind, "label": label, "time": at}
        )

    def _write(self, event: dict[str, Any]) -> None:
        append_jsonl(self.path, event)  # after a predecessor's torn line, on a line of its own


def _complete_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a kill mid-write


def summary_writer_class():
    """torch's SummaryWriter, which needs the tensorboard package: checked before a run starts,
    so a missing extra is named at once, not after the model is built."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "train.tensorboard = true needs the tensorboard package: "
            "pip install 'ostinato[tensorboard]' (or set train.tensorboard = false)"
        ) from None
    return SummaryWriter


def _tensorboard_writer(run_dir: Path):
    return summary_writer_class()(str(run_dir / "tensorboard"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl; a line torn by a kill is skipped (ostinato.jsonl)."""
    return read_jsonl(path)


def _train_status(record: dict[str, Any]) -> str:
    return f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"


class ProgressDisplay:
    """A rich progress bar on a terminal; a plain line every `every` steps otherwise."""

    def __init__(
        self,
        total: int,
        start: int,
        every: int,
        enabled: bool,
        label: str = "train",
        describe: Callable[[dict[str, Any]], str] | None = None,
    ):
        self.every, self.enabled, self.label = every, enabled, label
        self.describe = describe or _train_status
        self.console = Console()
        self.live = enabled and sys.stdout.isatty()
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task(label, total=total, completed=start, status="")
            self._progress.start()

    def update(self, record: dict[str, Any], total: int) -> None:
        status = self.describe(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], status=status)
        elif self.enabled and (record["step"] % self.every == 0 or record["step"] == total):
            prefix = "" if self.label == "train" else f"{self.label} "
            print(f"{prefix}step {record['step']}/{total}  {status}", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
