"""fleet.warm_start: every island starts from one checkpoint of `ostinato train`, named by its
checksum in the fleet's fingerprint, refused clearly when it is not that model or not intact."""

import pytest
import torch

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.store import MARKER
from ostinato.model.llama import Llama
from ostinato.train.state import checkpoint_id, start_from, warm_start_checkpoint
from ostinato.train.trainer import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("warm") / "run"
    train(tiny_config("train.steps=3", "train.eval_problems=0"), out, "none", show_progress=False)
    return out


def fleet_config(*overrides: str):
    return tiny_config("fleet.coordinator=127.0.0.1:1", *overrides)


def test_a_run_directory_means_its_newest_good_checkpoint(warm_run):
    checkpoint = warm_start_checkpoint(fleet_config(f"fleet.warm_start={warm_run}"))
    assert checkpoint is not None and checkpoint.parent == warm_run / "checkpoints"
    assert checkpoint_id(checkpoint) == (checkpoint / MARKER).read_text().strip()[:16]
    assert len(checkpoint_id(checkpoint)) == 16
    # a lone run (no coordinator) and a fleet without a warm start start from the seeded init
    assert warm_start_checkpoint(tiny_config(f"fleet.warm_start={warm_run}")) is None
    assert warm_start_checkpoint(fleet_config()) is None


def test_start_from_copies_the_trained_parameters(warm_run):
    cfg = fleet_config(f"fleet.warm_start={warm_run}")
    model = Llama(cfg.model)
    model.init_weights(0)
    start_from(model, cfg, warm_start_checkpoint(cfg))
    trained = load_trained(warm_run).model
    for (name, ours), theirs in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(ours, theirs), name


def test_another_model_is_refused_by_its_fields(warm_run):
    cfg = fleet_config(f"fleet.warm_start={warm_run}", "model.dim=128", "model.ffn_dim=256")
    with pytest.raises(ValueError, match=r"another model: model.dim 64 \(ours 128\)"):
        start_from(Llama(cfg.model), cfg, warm_start_checkpoint(cfg))


def test_a_missing_or_corrupted_warm_start_is_named(warm_run, tmp_path):
    with pytest.raises(ValueError, match="fleet.warm_start: .*neither a run directory"):
        warm_start_checkpoint(fleet_config(f"fleet.warm_start={tmp_path / 'nope'}"))
    checkpoint = warm_start_checkpoint(fleet_config(f"fleet.warm_start={warm_run}"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoint.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    meta = broken / "meta.json"
    meta.write_bytes(meta.read_bytes()[:-5])  # truncated
    with pytest.raises(ValueError, match="fleet.warm_start: .*cannot be used"):
        warm_start_checkpoint(fleet_config(f"fleet.warm_start={broken}"))
