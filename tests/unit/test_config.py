from pathlib import Path

import pytest

from ostinato.cli_support import parse_overrides
from ostinato.config import ConfigError, load_config, to_toml
from ostinato.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("name", ["demo", "tiny", "small", "1b", "8b"])
def test_shipped_recipes_validate(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    # vLLM's CPU attention accepts only these head sizes; every recipe must stay servable.
    assert cfg.model.head_dim in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "train.lr=0.5", "checkpoint.async_save=false"])
    assert (cfg.train.steps, cfg.train.lr, cfg.checkpoint.async_save) == (7, 0.5, False)
    assert load_config(None, ["data.source=files"]).data.source == "files"


def test_every_bad_field_is_named_in_one_error():
    with pytest.raises(ConfigError) as caught:
        load_config(
            None,
            ["model.size=huge", "train.steps=-1", "train.lr=fast", "data.nope=1", "optim.x=1"],
        )
    message = str(caught.value)
    assert "model.size = 'huge'" in message and "tiny, demo, small, 1b, 8b" in message
    assert "train.steps = -1" in message and ">= 1" in message
    assert "train.lr = 'fast'" in message and "must be a number" in message
    assert "data.nope: unknown key" in message and "seq_len" in message
    assert "[optim]: unknown section" in message


def test_a_number_or_a_word_field():
    """fleet.outer_lr takes a number or "auto", from a file or an override, and round-trips."""
    assert load_config(None).fleet.outer_lr == "auto"
    assert load_config(None, ["fleet.outer_lr=0.5"]).fleet.outer_lr == 0.5
    assert load_config(None, ["fleet.outer_lr=1"]).fleet.outer_lr == 1.0
    assert load_config(None, ["fleet.outer_lr=auto"]).fleet.outer_lr == "auto"
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["fleet.outer_lr=fast"])
    assert "fleet.outer_lr = 'fast'" in str(caught.value)
    assert "a number or auto" in str(caught.value)
    with pytest.raises(ConfigError, match=r"fleet.outer_lr = -0.1: must be >= 0.0"):
        load_config(None, ["fleet.outer_lr=-0.1"])
    with pytest.raises(ConfigError, match="fleet.outer_lr = True: must be a number"):
        load_config(None, ["fleet.outer_lr=true"])


def test_shape_and_length_checks():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(None, ["model.n_heads=4", "model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="data.seq_len = 512"):
        load_config(None, ["data.seq_len=512", "model.max_seq_len=256"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.toml", ["train.steps=3"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg.to_dict()))
    assert load_config(path) == cfg


def test_override_words():
    assert parse_overrides(["--train.steps=3", "--data.seed", "4"]) == [
        "train.steps=3",
        "data.seed=4",
    ]
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_overrides(["steps=3"])


def test_schedule_warmup_then_cosine():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(cfg.min_lr_ratio)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(55, cfg) == pytest.approx((1 + cfg.min_lr_ratio) / 2)
