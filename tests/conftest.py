"""Shared fixtures: small configs and a helper to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ostinato.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ostinato", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=cwd,
    )


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs two workers (pytest-xdist, --dist loadgroup): the multi-process tests of
    tests/dist all go to one of them, one at a time, so no two fleets share the 2 cores (their
    timeouts allow one other test beside them, as a loaded machine would); the unit and
    integration tests share the other worker."""
    for item in items:
        if "tests/dist/" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("processes"))


@pytest.fixture
def tiny() -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """A tiny model trained long enough to end some sampled answers with `#### N`: rewards then
    differ within groups, so updates move the parameters and the resume test can bite."""
    out = tmp_path_factory.mktemp("sft") / "run"
    done = run_cli(
        "train", "--config", str(TINY), "--out", str(out), "--train.steps=300",
        "--checkpoint.every=0", timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out
