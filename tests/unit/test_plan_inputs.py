"""Profiles, scenarios and the command: good input answers, bad input is refused with reasons."""

import json

import pytest
import torch

from ostinato.config import load_config
from ostinato.model.llama import Llama, count_parameters
from ostinato.plan.chips import FIGURES, load_profile, parse_profile, shipped_profiles
from ostinato.plan.command import plan
from ostinato.plan.costs import derive
from ostinato.plan.errors import PlanError
from ostinato.plan.scenario import build
from ostinato.train.parallel import strategy_of
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)

REQUIRED_JSON = {"time_to_train_hours", "goodput", "interruptions", "checkpoint_interval_s",
                 "inter_island_bytes_per_s", "energy_mwh", "cost", "p_finish_by_deadline",
                 "losses"}  # fmt: skip


def test_every_shipped_profile_loads_with_a_source_for_every_figure():
    names = shipped_profiles()
    for wanted in ("h100", "h800", "h20", "a100", "b200", "ascend-910b", "ascend-910c",
                   "cloudmatrix-384", "cpu-host"):  # fmt: skip
        assert wanted in names
    for name in names:
        profile = load_profile(name)
        assert all(profile.source(f) for f in FIGURES), name


def test_user_profile_missing_a_figure_is_named(tmp_path):
    text = "\n".join(f"{f} = 1" for f in FIGURES if f != "power_w")
    with pytest.raises(PlanError, match="power_w"):
        parse_profile(text, "mine.toml")
    path = tmp_path / "chip.toml"
    path.write_text(text.replace("mfu = 1", "mfu = 0.5") + "\npower_w = 300\n")
    assert load_profile(str(path)).power_w == 300


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"hardware": {"chips": 4, "islands": 8}}, "more islands than chips"),
        ({"hardware": {"chips": 10, "islands": 4}}, "split evenly"),
        ({"reliability": {"chip_mtbf_hours": -5}}, "chip_mtbf_hours.*>= 0"),
        ({"strategy": {"kind": "magic"}}, "allowed values: sync, torchft, fleet"),
        ({"strategy": {"kind": "fleet"}}, "islands >= 2"),
        ({"model": {"params": "big"}}, "model.params.*number"),
        ({"hardware": {"gpus": 8}}, "unknown key; allowed"),
        ({"cluster": {}}, "unknown section"),
    ],
)
def test_impossible_scenarios_are_refused(raw, match):
    with pytest.raises(PlanError, match=match):
        build(raw)


def test_model_that_does_not_fit_names_the_need():
    s = build({"model": {"params": 405e9}, "hardware": {"chips": 64, "islands": 8}})
    with pytest.raises(PlanError, match="does not fit.*at least 102 chips per island"):
        derive(s)


def test_unknown_profile_and_preset_list_the_allowed_ones():
    with pytest.raises(PlanError, match="h100"):
        derive(build({"hardware": {"profile": "tpu-v9"}}))
    with pytest.raises(PlanError, match="llama3-405b"):
        plan(preset="nope")


def test_scenario_file_with_sweep_and_overrides(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('[model]\nparams = 1e9\ntokens = 1e10\nbatch_tokens = 1e6\n'
                    '[hardware]\nprofile = "a100"\nchips = 64\nislands = 4\n')  # fmt: skip
    assert plan(scenario=str(path), json_out=True, overrides=['strategy.kind="fleet"']) == 0
    single = json.loads(capsys.readouterr().out)
    assert REQUIRED_JSON <= single.keys()
    assert single["strategy"] == "fleet" and single["checkpoint_interval_s"] is None
    assert plan(scenario=str(path), json_out=True, sweep=["strategy.kind=sync,fleet,torchft"]) == 0
    rows = json.loads(capsys.readouterr().out)["sweep"]
    assert [r["strategy"] for r in rows] == ["sync", "fleet", "torchft"]
    assert plan(scenario=str(path)) == 0  # the rich rendering runs
    assert "goodput" in capsys.readouterr().out


def test_bad_override_and_sweep_syntax():
    with pytest.raises(PlanError, match="section.key=value"):
        plan(overrides=["chips=3"])
    with pytest.raises(PlanError, match="--sweep"):
        plan(sweep=["hardware.chips"])


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "g.png"
    assert plan(preset="torchft-l40s", plot=str(out), json_out=True) == 0
    assert out.stat().st_size > 1000


def recipe_scenario(recipe: str, chips: int, **strategy) -> dict:
    """A plan for a shipped training recipe on one island of `chips` H100s, from the recipe's
    own model, sequence, micro-batch and [parallel] choices."""
    cfg = load_config(ROOT / "configs" / recipe)
    with torch.device("meta"):
        params = count_parameters(Llama(cfg.model))
    model = {"params": params, "n_layers": cfg.model.n_layers, "dim": cfg.model.dim}
    model["vocab_size"] = cfg.model.vocab_size
    model |= {"seq_len": cfg.data.seq_len, "micro_batch": cfg.train.batch_size}
    parallel = {"parallel": strategy_of(cfg.parallel, chips, in_fleet=False)}
    parallel["parallel"] = "fsdp" if parallel["parallel"] == "single" else parallel["parallel"]
    parallel["activation_checkpointing"] = cfg.parallel.activation_checkpointing
    hardware = {"profile": "h100", "chips": chips, "islands": 1}
    return {"model": model, "hardware": hardware, "strategy": parallel | strategy}


@pytest.mark.parametrize(("recipe", "least"), [("1b.toml", 1), ("8b.toml", 3)])
def test_the_shipped_recipes_need_the_island_their_comments_state(recipe, least):
    assert f"{least} H100" in (ROOT / "configs" / recipe).read_text().replace("one H100", "1 H100")
    derive(build(recipe_scenario(recipe, least)))
    if least > 1:
        with pytest.raises(PlanError, match=f"island of {least - 1} would hold"):
            derive(build(recipe_scenario(recipe, least - 1)))


def test_replicated_state_that_sharding_would_fit_is_refused_naming_fsdp():
    derive(build(recipe_scenario("8b.toml", 8)))
    with pytest.raises(PlanError, match="128.5 GB of training state.*strategy.parallel = fsdp"):
        derive(build(recipe_scenario("8b.toml", 8, parallel="ddp")))
    # recomputing less leaves less room for each chip's share of the state
    with pytest.raises(PlanError, match="recomputation selective.*at least 3 chips per island"):
        derive(build(recipe_scenario("8b.toml", 2, activation_checkpointing="selective")))
    with pytest.raises(PlanError, match="recomputation none.*at least 5 chips per island"):
        derive(build(recipe_scenario("8b.toml", 4, activation_checkpointing="none")))
    derive(build(recipe_scenario("8b.toml", 5, activation_checkpointing="none")))
