"""The CLI as a user meets it: help, doctor, and one-paragraph errors with exit code 2."""

import pytest

from tests.conftest import TINY, run_cli

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
