"""The learning curve of a run or a fleet: loss.png beside timeline.png.

Training loss (each step's, and its running mean) and validation loss against the tokens each
island has trained on, one colour per island; held-out accuracy below it when the run measured
any; the faults struck, as vertical lines at the tokens the island had reached when each struck.
Read from what the run already keeps: metrics.jsonl (a line per step), eval.jsonl (a line per
evaluation, train.eval_every) and the fault marks of events.jsonl.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ostinato.jsonl import read_jsonl

EVAL_FILE = "eval.jsonl"
SMOOTHING = 0.9  # weight of the past in the running mean of the training loss


def island_dirs(run_or_fleet_dir: Path) -> dict[str, Path]:
    """island name -> its run directory: the directory itself for a lone run."""
    root = Path(run_or_fleet_dir)
    if (root / "metrics.jsonl").is_file():
        return {root.name: root}
    return {p.parent.name: p.parent for p in sorted(root.glob("*/metrics.jsonl"))}


def tokens_at(steps: list[dict[str, Any]]) -> list[int]:
    """Tokens an island had trained on after each of its logged steps."""
    total, seen = 0, []
    for row in steps:
        total += int(row.get("tokens", 0))
        seen.append(total)
    return seen


def token_of_time(steps: list[dict[str, Any]], tokens: list[int], when: float) -> int | None:
    """Tokens trained on by wall-clock time `when` (steps log their end time), None if the
    steps carry no times."""
    timed = [(row["time"], n) for row, n in zip(steps, tokens, strict=True) if "time" in row]
    if not timed:
        return None
    before = [n for t, n in timed if t <= when]
    return before[-1] if before else 0


def running_mean(values: list[float]) -> list[float]:
    out, mean = [], None
    for value in values:
        mean = value if mean is None else SMOOTHING * mean + (1 - SMOOTHING) * value
        out.append(mean)
    return out


def curves(run_or_fleet_dir: Path) -> dict[str, dict[str, Any]]:
    """Per island: tokens and losses of its steps, its evaluations and its faults."""
    found = {}
    for name, folder in island_dirs(run_or_fleet_dir).items():
        steps = [r for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]
        tokens = tokens_at(steps)
        evals = read_jsonl(folder / EVAL_FILE) if (folder / EVAL_FILE).is_file() else []
        events = read_jsonl(folder / "events.jsonl") if (folder / "events.jsonl").is_file() else []
        faults = [
            (token_of_time(steps, tokens, e["time"]), e.get("label", "fault"))
            for e in events
            if e.get("type") == "mark" and e.get("kind") == "fault"
        ]
        found[name] = {
            "tokens": tokens,
            "loss": [float(r["loss"]) for r in steps],
            "evals": evals,
            "faults": [(n, label) for n, label in faults if n is not None],
        }
    return found


def draw_loss(run_or_fleet_dir: str | Path, path_png: str | Path, title: str) -> bool:
    """Draw loss.png; False (nothing drawn) when no island logged a step."""
    found = curves(Path(run_or_fleet_dir))
    if not any(c["tokens"] for c in found.values()):
        return False
    # Lazy: matplotlib is slow to import and only reports need it (as goodput.draw_timeline).
    from matplotlib.figure import Figure

    accuracy = any(e.get("accuracy") is not None for c in found.values() for e in c["evals"])
    fig = Figure(figsize=(10, 6.5 if accuracy else 4.5), layout="constrained")
    axes = fig.subplots(2 if accuracy else 1, 1, sharex=True, squeeze=False)[:, 0]
    for index, (name, c) in enumerate(sorted(found.items())):
        colour = f"C{index % 10}"
        _draw_island(axes, name, colour, c)
    axes[0].set_ylabel("loss")
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, loc="upper right")
    if accuracy:
        axes[1].set_ylabel("held-out accuracy")
        axes[1].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel("tokens trained on (per island)")
    fig.savefig(path_png, dpi=110)
    return True


def _draw_island(axes, name: str, colour: str, c: dict[str, Any]) -> None:
    loss_ax = axes[0]
    loss_ax.plot(c["tokens"], c["loss"], color=colour, alpha=0.25, linewidth=0.6)
    loss_ax.plot(c["tokens"], running_mean(c["loss"]), color=colour, label=f"{name} train")
    validated = [e for e in c["evals"] if e.get("val_loss") is not None]
    if validated:
        loss_ax.plot(
            [e["tokens"] for e in validated],
            [e["val_loss"] for e in validated],
            color=colour,
            linestyle="--",
            marker="o",
            markersize=3,
            label=f"{name} validation",
        )
    answered = [e for e in c["evals"] if e.get("accuracy") is not None]
    if answered and len(axes) > 1:
        axes[1].plot(
            [e["tokens"] for e in answered],
            [e["accuracy"] for e in answered],
            color=colour,
            marker="o",
            markersize=3,
            label=name,
        )
    for tokens, label in c["faults"]:
        for ax in axes:
            ax.axvline(tokens, color="#d62728", linestyle=":", linewidth=1.0)
        loss_ax.annotate(
            f"{name}: {label}",
            (tokens, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="#d62728",
            rotation=90,
            ha="right",
            va="top",
        )
