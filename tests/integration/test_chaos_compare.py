"""`ostinato chaos --compare`: fault-free references on three seeds, on equal tokens. Fleets of
one island (and a coordinator) at a time, light enough to run beside the tests/dist group."""

import json

import pytest
from typer.testing import CliRunner

from ostinato.cli import app
from tests.conftest import TINY
from tests.dist.fleet_helpers import FAST, STEP_BUDGET, Running, ostinato, rounds

pytestmark = pytest.mark.timeout(400)


def test_compare_runs_three_seeded_references_on_equal_tokens(tmp_path):
    """chaos --compare: the fault-free fleet for train.seed 0, 1 and 2 first, each the chaos
    run's tokens (a step budget); the report keeps each final loss, the table their spread.
    Fleets of one island, and a fault that needs no restart: four fleets run one after another,
    and what is tested here is the comparison, not recovery."""
    out = tmp_path / "chaos"
    command = ostinato("chaos", "--config", str(TINY), "--out", str(out), "--islands", "1")
    recipe = ["--fleet.rounds=4", "--train.steps=20", "--compare", *STEP_BUDGET]
    run = Running([*command, "--faults", "nan@island=a,step=7", *recipe])
    assert run.wait(600) == 0, run.output[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    losses = report["reference_losses"]
    assert sorted(losses) == ["0", "1", "2"] and all(isinstance(v, float) for v in losses.values())
    assert report["reference_loss"] == losses["0"]
    assert len(set(losses.values())) == 3  # other initialisations, other losses
    for seed in range(3):
        assert len(rounds(out / "reference" / f"seed{seed}")) == 4
    low, high = min(losses.values()), max(losses.values())
    assert f"(3 seeds: {low:.4f}-{high:.4f})" in run.output


def test_compare_on_a_time_budget_is_refused_before_anything_starts(tmp_path):
    result = CliRunner().invoke(
        app,
        ["chaos", "--config", str(TINY), "--out", str(tmp_path / "chaos"), "--islands", "2",
         "--faults", "crash@island=b,round=2", "--compare", "--fleet.budget=seconds:1",
         "--fleet.rounds=4", *FAST],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--fleet.budget=steps:H" in result.stderr
    assert not (tmp_path / "chaos").exists()
