"""One exit code per kind of failure, and the local fleet's restart rule that reads them."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from ostinato import errors
from ostinato.cli_support import Debug, user_errors
from ostinato.config import ConfigError
from ostinato.fleet.joining import Refused
from ostinato.fleet.local import LocalFleet, fleet_exit_code, should_restart
from ostinato.fleet.wire import Unreachable
from ostinato.plan.errors import PlanError

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    "exc, code",
    [
        (ValueError("x"), errors.BAD_INPUT),
        (ConfigError("model.size: x"), errors.BAD_INPUT),
        (PlanError("x"), errors.BAD_INPUT),
        (errors.BadInput("x"), errors.BAD_INPUT),
        (Refused("wrong fleet token"), errors.REFUSED),  # the fleet's own classes keep the codes
        (Unreachable("not reachable"), errors.UNREACHABLE),
        (errors.Refused("x"), errors.REFUSED),
        (errors.Unreachable("x"), errors.UNREACHABLE),
        (RuntimeError("a bug"), errors.INTERNAL),
        (KeyError("a bug"), errors.INTERNAL),
    ],
)
def test_each_kind_of_error_has_its_code(exc, code):
    assert errors.exit_code_of(exc) == code


def _app_raising(exc: BaseException) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @user_errors
    def fail(debug: Debug = False) -> None:
        raise exc

    return app


@pytest.mark.parametrize(
    "exc, code",
    [
        (ValueError("bad field"), 2),
        (Refused("refused island 'b'"), 3),
        (Unreachable("coordinator not reachable"), 4),
    ],
)
def test_user_errors_end_with_one_line_and_the_kind_s_code(exc, code):
    result = CliRunner().invoke(_app_raising(exc), [])
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert str(exc) in result.output and "Traceback" not in result.output


def test_a_bug_is_not_a_user_error():
    result = CliRunner().invoke(_app_raising(RuntimeError("a bug")), [])
    assert result.exit_code == errors.INTERNAL
    assert isinstance(result.exception, RuntimeError)  # raised on: typer shows the traceback


def test_restart_rule():
    assert not should_restart(0, 0, 3)  # finished
    assert not should_restart(errors.BAD_INPUT, 0, 3)  # would fail the same way again
    assert not should_restart(errors.REFUSED, 0, 3)
    assert should_restart(errors.UNREACHABLE, 0, 3)  # transient
    assert should_restart(errors.INTERNAL, 0, 3)
    assert should_restart(-9, 2, 3)  # killed by a signal (SIGKILL)
    assert not should_restart(errors.UNREACHABLE, 3, 3)  # out of restarts


def test_fleet_exit_code_names_what_stopped_it():
    assert fleet_exit_code([0, 0]) == 0
    assert fleet_exit_code([errors.REFUSED, None]) == errors.REFUSED  # b stopped by the fleet
    assert fleet_exit_code([0, errors.BAD_INPUT]) == errors.BAD_INPUT
    assert fleet_exit_code([errors.UNREACHABLE, 0]) == errors.UNREACHABLE
    assert fleet_exit_code([errors.UNREACHABLE, -9]) == errors.INTERNAL
    assert fleet_exit_code([0, None]) == errors.INTERNAL


# An island as a tiny process: its first start (--resume none) exits with FIRST; a restart (the
# supervisor passes --resume auto) with THEN; "sleep" sleeps for two minutes instead.
ISLAND = """
import sys, time
first, then, resume = sys.argv[1], sys.argv[2], sys.argv[-1]
code = first if resume == "none" else then
if code == "sleep":
    time.sleep(120)
sys.exit(int(code))
"""


class ScriptedFleet(LocalFleet):
    """LocalFleet's supervisor (restart rule, stop on a permanent code, exit code) with islands
    that exit as told and no coordinator: what is under test is what the supervisor decides."""

    def __init__(self, out, plan: dict[str, tuple[object, object]], max_restarts: int = 3):
        super().__init__(out / "r.toml", out, list(plan), [], {}, "none", max_restarts)
        self.plan = plan

    def start_coordinator(self) -> str:
        return "127.0.0.1:1"  # never dialled: the scripted islands do not join anything

    def island_command(self, name: str, address: str) -> list[str]:
        first, then = self.plan[name]
        return [sys.executable, "-c", ISLAND, str(first), str(then), "--resume", self.resume]


def test_an_island_unreachable_once_is_restarted_and_the_fleet_completes(tmp_path):
    fleet = ScriptedFleet(tmp_path, {"a": (errors.UNREACHABLE, 0), "b": (0, 0)})
    assert fleet.run() == 0
    assert fleet.islands["a"].exits == [errors.UNREACHABLE, 0]
    assert fleet.islands["b"].exits == [0]
    # no island logged an event: the goodput account is empty, not a missing-file error
    assert json.loads((tmp_path / "goodput.json").read_text())["island_s"] == 0


def test_a_crashing_island_runs_out_of_restarts(tmp_path):
    fleet = ScriptedFleet(tmp_path, {"a": (errors.UNREACHABLE, errors.UNREACHABLE), "b": (0, 0)}, 2)
    assert fleet.run() == errors.UNREACHABLE
    assert fleet.islands["a"].exits == [errors.UNREACHABLE] * 3


@pytest.mark.parametrize("code", [errors.BAD_INPUT, errors.REFUSED])
def test_a_permanent_failure_stops_the_fleet_with_its_code(tmp_path, code):
    fleet = ScriptedFleet(tmp_path, {"a": (code, 0), "b": ("sleep", "sleep")})
    started = time.monotonic()
    assert fleet.run() == code
    assert fleet.islands["a"].exits == [code] and fleet.islands["a"].restarts == 0
    assert time.monotonic() - started < 60  # b was stopped, not waited for
    assert fleet.islands["b"].process.wait(timeout=10) == -signal.SIGKILL  # killed by stop()
