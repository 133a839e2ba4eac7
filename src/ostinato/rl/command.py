"""`ostinato rl`: the command of reinforcement-learning post-training (ostinato.rl.trainer)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated

import typer

from ostinato.cli_support import OVERRIDES, Debug, parse_overrides, user_errors


def explicit_sections(config: Path, overrides: list[str]) -> set[str]:
    """The sections the recipe or an override sets: those must agree with rl.init's run."""
    try:
        tables = set(tomllib.loads(config.read_text()))
    except (OSError, tomllib.TOMLDecodeError):
        tables = set()  # load_config has already named the problem
    return tables | {item.split(".", 1)[0] for item in overrides}


def rl(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option(help="TOML recipe; its rl section says what.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<recipe>).")] = None,
    resume: Annotated[
        str, typer.Option(help="auto, none, a run directory or a checkpoint.")
    ] = "auto",
    debug: Debug = False,
) -> None:
    """Post-train a model of `ostinato train` with GRPO on verifiable tasks.

    rl.init names the run (or checkpoint) to start from; its model, tokenizer and data (and so
    its held-out problems) are kept. DIR gets metrics.jsonl, summary.json, curve.png and
    checkpoints/ that `ostinato export`, `serve` and `chat` read like a training run's.
    With rl.rollout_islands = K it starts K rollout islands (`ostinato rl rollout --help`).
    """
    if config is None:
        raise typer.BadParameter("--config is required", param_hint="--config")
    from rich.console import Console

    from ostinato.config import load_config
    from ostinato.rl.report import draw_curve
    from ostinato.rl.trainer import run_rl

    overrides = parse_overrides(ctx.args)
    cfg = load_config(config, overrides)
    out = out or Path("runs") / config.stem
    result = run_rl(cfg, out, resume, explicit_sections(config, overrides))
    draw_curve(out, out / "curve.png")
    console = Console()
    console.rule("[bold]rl result")
    console.print(f"run directory       {out}")
    console.print(f"updates             {result.step}")
    console.print(
        f"held-out accuracy   {result.initial_accuracy:.1%} -> {result.final_accuracy:.1%}"
    )
    for task, answer in result.samples:
        console.print(f"[dim]{task.prompt}[/] {answer.strip()}", highlight=False)


rollout_app = typer.Typer(add_completion=False)


@rollout_app.command()
@user_errors
def rollout(
    coordinator: Annotated[str, typer.Option(help="HOST:PORT of the RL trainer's store.")],
    island: Annotated[str, typer.Option(help="This island's name, e.g. r0.")],
    model_from: Annotated[
        str,
        typer.Option(
            help="Run or checkpoint whose model this island runs (default: the trainer's)."
        ),
    ] = "",
    debug: Debug = False,
) -> None:
    """A rollout island: generate rollouts for the RL trainer at COORDINATOR (the fleet token
    from OSTINATO_FLEET_TOKEN). The trainer starts these itself; on another host, start them by
    hand."""
    from ostinato.rl.island import RolloutIsland

    RolloutIsland(coordinator, island, os.environ.get("OSTINATO_FLEET_TOKEN", ""), model_from).run()


def run_rollout_island(args: list[str]) -> None:
    """`ostinato rl rollout ...`: dispatched before `rl`, whose extra words are overrides."""
    typer.main.get_command(rollout_app)(args, prog_name="ostinato rl rollout")


def register(app: typer.Typer) -> None:
    app.command("rl", context_settings=OVERRIDES)(user_errors(rl))
