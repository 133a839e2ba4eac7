"""The CLI as a user meets it: help, doctor, and one-line errors with one exit code per kind."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, cli_env, run_cli
from tests.integration.test_bad_files import damaged

pytestmark = pytest.mark.timeout(120)


def assert_user_error(done, *words):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_help_comes_from_the_docstrings():
    done = run_cli("train", "--help")
    assert done.returncode == 0 and "Train a model on one island" in done.stdout
    assert "--resume" in done.stdout


def test_doctor_reports_the_stack():
    done = run_cli("doctor")
    assert done.returncode == 0, done.stderr
    assert "gloo" in done.stdout and "would use" in done.stdout and "device cpu" in done.stdout


def test_missing_and_malformed_configs(tmp_path):
    assert_user_error(run_cli("train", "--config", str(tmp_path / "nope.toml")), "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nsize = 'tiny'")
    assert_user_error(run_cli("train", "--config", str(bad)), "not valid TOML")


def test_unknown_model_size_names_the_allowed_ones():
    done = run_cli("train", "--config", str(TINY), "--model.size=13b")
    assert_user_error(done, "model.size", "tiny, demo, small, 1b, 8b")


def test_missing_data_path_and_empty_corpus(tmp_path):
    missing = f'--data.path="{tmp_path / "nowhere"}"'
    done = run_cli("train", "--config", str(TINY), "--data.source=files", missing)
    assert_user_error(done, "data.path", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    empty = f'--data.path="{tmp_path}"'
    done = run_cli(
        "train", "--config", str(TINY), "--data.source=files", empty, "--out", str(tmp_path / "r")
    )
    assert_user_error(done, "corpus is empty")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    first = run_cli("train", "--config", str(TINY), "--out", str(tmp_path / "a"), "--train.steps=1")
    assert first.returncode == 0, first.stderr
    tokenizer = f'--data.tokenizer="{tmp_path / "a" / "tokenizer.json"}"'
    done = run_cli(
        "train",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path / "b"),
        tokenizer,
        "--model.vocab_size=256",
    )
    assert_user_error(done, "model.vocab_size is 256", "--model.vocab_size=")


def test_checkpoint_from_an_incompatible_config(tmp_path):
    out = str(tmp_path / "run")
    assert run_cli("train", "--config", str(TINY), "--out", out, "--train.steps=2").returncode == 0
    done = run_cli(
        "train", "--config", str(TINY), "--out", out, "--model.n_layers=3", "--train.steps=4"
    )
    assert_user_error(done, "model.n_layers: 2 in the checkpoint, 3 now", "--resume none")


def test_debug_shows_the_traceback(tmp_path):
    done = run_cli("train", "--config", str(tmp_path / "nope.toml"), "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr


# --- one exit code per kind of failure (ostinato.errors) ----------------------------------------


def last_line_error(done, code: int, *words: str) -> str:
    """The command ended with exit `code` and its message last: `error: ...` naming `words` (one
    line; a config error goes on with one line per bad field), no traceback."""
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, done.stderr[-2000:]
    message = "\n".join(lines[starts[-1] :])
    assert all(line.startswith("  ") for line in lines[starts[-1] + 1 :]), message
    for word in words:
        assert word in message, message
    return message


def test_help_lists_the_exit_codes():
    done = run_cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # rich wraps the epilog
    for words in ("2 bad input", "3 refused by the fleet", "4 a peer was unreachable"):
        assert words in text, done.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def coordinator():
    """A coordinator on 127.0.0.1 (port 0) whose fleet token is "right"; yields its address."""
    env = {**cli_env(), "OSTINATO_FLEET_TOKEN": "right"}
    command = [sys.executable, "-m", "ostinato", "fleet", "coordinator", "--bind", "127.0.0.1:0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stdout:  # log lines may come first
            if line.startswith("coordinator on "):
                yield line.split()[-1]
                break
        else:
            pytest.fail(f"the coordinator did not start (exit {process.wait()})")
    finally:
        process.kill()
        process.wait()


ISLAND = ("train", "--config", str(TINY), "--train.steps=2", "--fleet.island=a")


def test_exit_code_2_bad_input(tmp_path):
    done = run_cli(*ISLAND, "--out", str(tmp_path / "bad"), "--model.size=13b")
    last_line_error(done, 2, "model.size")


def test_exit_code_3_refused_by_the_fleet(tmp_path, coordinator):
    done = run_cli(
        *ISLAND,
        "--out",
        str(tmp_path / "refused"),
        f"--fleet.coordinator={coordinator}",
        "--fleet.token=wrong",
    )
    last_line_error(done, 3, "refused island 'a'", "wrong fleet token")


def test_exit_code_4_unreachable_coordinator(tmp_path):
    done = run_cli(
        *ISLAND,
        "--out",
        str(tmp_path / "unreachable"),
        f"--fleet.coordinator=127.0.0.1:{free_port()}",
        "--fleet.connect_timeout_s=1",
        "--fleet.token=right",
    )
    last_line_error(done, 4, "not reachable")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from ostinato.config import load_config
    from ostinato.serve.convert import export_model
    from ostinato.train.trainer import train

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY, ["train.steps=2", "checkpoint.every=2", "train.eval_problems=0"])
    train(cfg, run, "none", show_progress=False)
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(run, out)
    return out


def without(config_json: Path, key: str) -> str:
    config = json.loads(config_json.read_text())
    del config[key]
    return json.dumps(config)


@pytest.mark.parametrize(
    "file, text, words",
    [
        ("tokenizer.json", None, ("tokenizer", "tokenizer.json")),
        ("tokenizer.json", '{"version": "1.0", "mod', ("tokenizer", "tokenizer.json")),
        ("config.json", "hidden_size", ("config.json", "hidden_size")),
    ],
    ids=["missing tokenizer", "corrupt tokenizer", "incomplete config"],
)
def test_serve_a_broken_export_is_one_line(export_dir, tmp_path, file, text, words):
    if text == "hidden_size":
        text = without(export_dir / "config.json", "hidden_size")
    broken = damaged(export_dir, tmp_path, file, text)
    done = run_cli("serve", str(broken), "--port", "0", "--device", "cpu", timeout=60)
    last_line_error(done, 2, *words)


def test_import_an_incomplete_config_is_one_line(export_dir, tmp_path):
    text = without(export_dir / "config.json", "num_attention_heads")
    broken = damaged(export_dir, tmp_path, "config.json", text)
    done = run_cli("import", str(broken), "--out", str(tmp_path / "run"))
    last_line_error(done, 2, "config.json", "num_attention_heads")


def test_calibrate_a_directory_without_a_run_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "events.jsonl").write_text('{"type": "sp')  # torn, and nothing else
    done = run_cli("plan", "--calibrate", str(tmp_path))
    last_line_error(done, 2, "not an ostinato run")


def test_serve_a_negative_thread_count_is_one_line(export_dir):
    done = run_cli("serve", str(export_dir), "--port", "0", "--threads", "-1", timeout=60)
    last_line_error(done, 2, "--threads -1")
