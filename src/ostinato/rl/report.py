"""curve.png of an RL run: held-out accuracy and mean reward against wall-clock."""

from __future__ import annotations

import json
from pathlib import Path

from ostinato.jsonl import read_jsonl


def draw_curve(run_dir: Path, path_png: Path) -> bool:
    """Write the curve; False when the run has no updates logged yet."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        return False
    summary = json.loads((run_dir / "summary.json").read_text())
    # Lazy: matplotlib is slow to import and only reports need it (as curves.draw_loss).
    from matplotlib.figure import Figure

    start = summary.get("started_at") or rows[0]["time"]
    figure = Figure(figsize=(8, 4.5))
    axes = figure.add_subplot()
    minutes = [(row["time"] - start) / 60 for row in rows]
    axes.plot(minutes, [row["reward"] for row in rows], color="tab:blue", label="mean reward")
    axes.plot(
        minutes, [row["solved"] for row in rows], color="tab:cyan", label="answers right (sampled)"
    )
    evaluated = [(0.0, summary["initial_accuracy"])]  # measured before the first update
    evaluated += [
        (m, row["accuracy"]) for m, row in zip(minutes, rows, strict=True) if "accuracy" in row
    ]
    axes.plot(
        *zip(*evaluated, strict=True), "o-", color="tab:red", label="held-out accuracy (greedy)"
    )
    axes.set_xlabel("wall-clock minutes")
    axes.set_ylim(0, max(1.1, max(row["reward"] for row in rows) * 1.05))
    axes.set_title(f"{Path(run_dir).name}: GRPO")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path_png, dpi=100)
    return True
