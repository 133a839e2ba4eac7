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


def main() -> None:
    app(prog_name="ostinato")


if __name__ == "__main__":
    sys.exit(main())
