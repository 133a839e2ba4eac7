"""Shared pieces of the command-line layer: error handling, logging, override parsing."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ostinato.errors import exit_code_of

err = Console(stderr=True, soft_wrap=True)  # error messages keep paths on one line
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=err, show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs captured to a file stay one event per line
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def user_errors(command):
    """End a command that fails in a way the user can act on with one line and the exit code of
    its kind (ostinato.errors): 2 bad input (ValueError and its ConfigError/CheckpointError kin),
    3 refused by the fleet, 4 an unreachable peer. Anything else is a bug: traceback, exit 1."""

    @functools.wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        _setup_logging()
        try:
            return command(*args, **kwargs)
        except ValueError as exc:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exit_code_of(exc)) from None

    return wrapper


def parse_overrides(args: list[str]) -> list[str]:
    """`--section.key=value` or `--section.key value` words into `section.key=value` strings."""
    result, words = [], list(args)
    while words:
        word = words.pop(0)
        if not word.startswith("--") or "." not in word.split("=")[0]:
            raise ValueError(
                f"unexpected argument {word!r}: overrides look like --section.key=value"
            )
        if "=" not in word:
            if not words:
                raise ValueError(f"override {word} has no value: write {word}=VALUE")
            word = f"{word}={words.pop(0)}"
        result.append(word[2:])
    return result
