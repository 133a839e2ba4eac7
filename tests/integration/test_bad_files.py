"""Files from elsewhere that are missing, corrupt or incomplete: `serve`, `chat` and `import`
end with one line naming the file and what is wrong, and exit code 2; never a traceback.
(tests/integration/test_cli.py runs `serve` and `import` on broken exports as subprocesses;
these run in-process, so they can afford every command and file.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from ostinato.config import MODEL_SIZES, ModelConfig
from ostinato.data.tokenizer import train_tokenizer
from ostinato.model import hf
from ostinato.model.llama import Llama
from ostinato.serve.commands import register
from ostinato.serve.convert import write_hf_dir

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """An export of an untrained tiny model: what is checked here is the files, not the model."""
    cfg = ModelConfig(size="tiny", max_seq_len=64, **MODEL_SIZES["tiny"])
    model = Llama(cfg)
    model.init_weights(0)
    tokenizer = train_tokenizer(["Question: What is 2 + 3?\nAnswer: 5 #### 5"], 300)
    out = tmp_path_factory.mktemp("export")
    write_hf_dir(model, tokenizer, out, torch.float32, hf.DEFAULT_SHARD_BYTES)
    return out


def cli(*args: str | Path) -> tuple[int, str]:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *named: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in output, output
    assert len(errors) == 1 and all(n in errors[0] for n in named), output


def damaged(export_dir: Path, tmp_path: Path, file: str, content: str | None) -> Path:
    """A copy of the export with `file` replaced by `content` (None: removed)."""
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    if content is None:
        (copy / file).unlink()
    else:
        (copy / file).write_text(content)
    return copy


@pytest.mark.parametrize("command", ["serve", "chat"])
@pytest.mark.parametrize(
    "content, problem", [(None, "no such file"), ('{"version": "1.0", "mod', "not a tokenizer")]
)
def test_a_missing_or_corrupt_tokenizer_is_one_line(
    export_dir, tmp_path, command, content, problem
) -> None:
    directory = damaged(export_dir, tmp_path, "tokenizer.json", content)
    code, output = cli(command, directory, "--device", "cpu")
    assert_one_line_error(code, output, str(directory / "tokenizer.json"), problem)


def incomplete_config(export_dir: Path) -> str:
    config = json.loads((export_dir / "config.json").read_text())
    del config["num_hidden_layers"]
    return json.dumps(config)


@pytest.mark.parametrize("command", ["serve", "import"])
def test_an_incomplete_config_json_names_the_missing_field(export_dir, tmp_path, command) -> None:
    directory = damaged(export_dir, tmp_path, "config.json", incomplete_config(export_dir))
    args = ["--out", tmp_path / "run"] if command == "import" else ["--device", "cpu"]
    code, output = cli(command, directory, *args)
    assert_one_line_error(code, output, "config.json", "num_hidden_layers is missing")
    assert not (tmp_path / "run").exists()


def test_a_tokenizer_config_that_is_not_json_names_the_file(export_dir, tmp_path) -> None:
    directory = damaged(export_dir, tmp_path, "tokenizer_config.json", "{'single': 'quotes'}")
    code, output = cli("serve", directory, "--device", "cpu")
    assert_one_line_error(code, output, str(directory / "tokenizer_config.json"), "not readable")
