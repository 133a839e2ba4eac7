"""Crafted checkpoints, their checksums and marker rewritten to match, given to the CLI as a user
would: `train --resume PATH`, `export` and `verify` each refuse them with one line and exit
code 2, and the shell command inside them never runs (its marker file does not appear)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ostinato.serve.convert import export_model
from ostinato.train.trainer import train
from tests import hostile
from tests.conftest import TINY, run_cli, tiny_config

pytestmark = pytest.mark.timeout(600)  # 3 CLI runs of ~20 s each on a loaded 2-core box, and a run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(tiny_config("train.steps=5", "train.eval_problems=0", "train.samples=0"), out, "none")
    return out


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(run_dir, out)
    return out


def crafted(run_dir: Path, tmp_path: Path, kind: str) -> tuple[Path, Path, str]:
    """A copy of the run's checkpoint made hostile; its marker; what the refusal must name."""
    checkpoint = tmp_path / "step_00000005"
    shutil.copytree(run_dir / "checkpoints" / checkpoint.name, checkpoint)
    marker = tmp_path / "pwned"
    if kind == "stack_global":
        hostile.plant_stack_global(checkpoint, marker)
        fqn, refusal = "model.norm.weight", "refused to load 'os.system'"
    else:
        fqn = hostile.plant_bytes_entry(checkpoint, marker)
        refusal = f"refused entry {fqn!r}: stored as BytesStorageMetadata"
    assert hostile.is_live(checkpoint, marker, fqn, tmp_path)  # a plain DCP reader runs it
    return checkpoint, marker, f"{checkpoint / '.metadata'}: {refusal}"


def assert_refused(done, refusal: str, marker: Path) -> None:
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, output
    assert len(errors) == 1 and refusal in errors[0], output
    assert "Traceback" not in output, output
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["stack_global", "bytes_entry"])
def test_train_export_and_verify_refuse_a_hostile_checkpoint(
    run_dir, export_dir, tmp_path, kind
) -> None:
    checkpoint, marker, refusal = crafted(run_dir, tmp_path, kind)
    resumed = run_cli(
        "train",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path / "resumed"),
        "--resume",
        str(checkpoint),
        "--train.steps=6",
        "--train.eval_problems=0",
    )
    assert_refused(resumed, refusal, marker)
    assert_refused(
        run_cli("export", str(checkpoint), "--out", str(tmp_path / "x")), refusal, marker
    )
    assert not (tmp_path / "x").exists()
    verified = run_cli("verify", str(export_dir), "--checkpoint", str(checkpoint))
    assert_refused(verified, refusal, marker)
