"""The `ostinato` command: a thin map from command names to typed functions.

Each command's docstring is its --help. User errors (a bad config, a missing file, an unusable
checkpoint) end with a one-paragraph message and exit code 2; --debug shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ostinato.cli_support import OVERRIDES, Debug, parse_overrides, user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.command(context_settings=OVERRIDES)
@user_errors
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="TOML recipe, e.g. configs/demo.toml.")],
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/<recipe name>).")
    ] = None,
    resume: Annotated[
        str, typer.Option(help="auto, none, a run directory or a checkpoint.")
    ] = "auto",
    debug: Debug = False,
) -> None:
    """Train a model on one island (one process, or every rank under torchrun).

    Any config field can be overridden as --section.key=value, e.g. --train.steps=200.
    The run directory gets config.toml, metrics.jsonl, tokenizer.json and checkpoints/.
    """
    from ostinato.config import load_config
    from ostinato.train.report import print_result
    from ostinato.train.trainer import train as run_training

    cfg = load_config(config, parse_overrides(ctx.args))
    result = run_training(cfg, out or Path("runs") / config.stem, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print_result(result)


@app.command()
@user_errors
def doctor(debug: Debug = False) -> None:
    """Print the devices, backends and versions found here, and what training would use."""
    from ostinato.train.report import print_doctor

    print_doctor()


@app.command(context_settings=OVERRIDES)
@user_errors
def plan(
    ctx: typer.Context,
    scenario: Annotated[str | None, typer.Argument(help="Scenario TOML file.")] = None,
    preset: Annotated[
        str | None, typer.Option(help="llama3-405b, torchft-l40s, r2-on-ascend.")
    ] = None,
    sweep: Annotated[
        list[str] | None, typer.Option(help="section.key=v1,v2,... (repeatable).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[
        str | None, typer.Option(help="Draw goodput against scale to FILE.png.")
    ] = None,
    calibrate: Annotated[
        str | None, typer.Option(help="Fit and predict back a measured run.")
    ] = None,
    deadline_hours: Annotated[float | None, typer.Option(help="Deadline for P(finish).")] = None,
    price_per_chip_hour: Annotated[float | None, typer.Option(help="Price for the cost.")] = None,
    debug: Debug = False,
) -> None:
    from ostinato.plan.command import plan as run_plan

    code = run_plan(
        scenario,
        preset,
        sweep or [],
        json_out,
        plot,
        calibrate,
        deadline_hours,
        price_per_chip_hour,
        parse_overrides(ctx.args),
    )
    raise typer.Exit(code)


def _planner_help() -> str:
    from ostinato.plan.command import plan as run_plan

    return run_plan.__doc__ or ""


plan.__doc__ = _planner_help()


from ostinato.serve.commands import register as register_serving  # noqa: E402

register_serving(app)


def main() -> None:
    app(prog_name="ostinato")


if __name__ == "__main__":
    sys.exit(main())
