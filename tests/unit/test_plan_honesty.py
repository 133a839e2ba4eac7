"""Planner honesty: fitted figures are labelled, the exchange is sized as the fleet sends it, and
a fit predicts runs it did not see (plan/'s import cycles: tests/unit/test_imports.py)."""

import json

import pytest

from ostinato.fleet.compress import message_bytes
from ostinato.plan.command import plan
from ostinato.plan.costs import derive
from ostinato.plan.errors import PlanError
from ostinato.plan.scenario import build, shipped_presets
from ostinato.plan.transfer import predict

pytestmark = pytest.mark.timeout(120)


def run_json(capsys, **kw) -> dict:
    assert plan(json_out=True, **kw) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("preset", "fitted"),
    [
        ("llama3-405b", ["model.tokens", "reliability.chip_mtbf_hours"]),
        ("torchft-l40s", ["hardware.inter_island_gbit_s", "model.batch_tokens", "model.tokens"]),
    ],
)
def test_a_preset_lists_the_fields_it_fitted_to_its_source(capsys, preset, fitted):
    assert run_json(capsys, preset=preset, overrides=["run.trials=20"])["fitted"] == fitted


def test_a_field_set_again_by_the_user_is_no_longer_fitted(capsys, tmp_path):
    overridden = run_json(capsys, preset="llama3-405b", overrides=["model.tokens=1e12",
                                                                   "run.trials=20"])  # fmt: skip
    assert overridden["fitted"] == ["reliability.chip_mtbf_hours"]
    scenario = tmp_path / "mine.toml"
    scenario.write_text("[reliability]\nchip_mtbf_hours = 20000\n[run]\ntrials = 20\n")
    from_file = run_json(capsys, scenario=str(scenario), preset="llama3-405b")
    assert from_file["fitted"] == ["model.tokens"]
    swept = run_json(capsys, preset="llama3-405b", overrides=["run.trials=20"],
                     sweep=["model.tokens=1e12,2e12"])["sweep"]  # fmt: skip
    assert [row["fitted"] for row in swept] == [["reliability.chip_mtbf_hours"]] * 2


def test_a_scenario_without_a_fitted_table_fits_nothing_and_the_table_view_says_so(capsys):
    assert run_json(capsys, overrides=["run.trials=20"])["fitted"] == []
    assert plan(preset="llama3-405b", overrides=["run.trials=20"]) == 0
    shown = capsys.readouterr().out
    assert "fitted to the source's own figures" in shown and "model.tokens" in shown


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ('"model.tokenz" = "x"', "'model.tokenz' is no field"),
        ('"model.tokens" = 3', "needs a string"),
        ('"islands.0.speed" = "x"', "'islands.0.speed' is no field"),
    ],
)
def test_a_bad_fitted_table_is_refused_by_name(tmp_path, table, match):
    scenario = tmp_path / "bad.toml"
    scenario.write_text(f"[fitted]\n{table}\n")
    with pytest.raises(PlanError, match=match):
        plan(scenario=str(scenario))


def test_every_shipped_preset_names_real_fields_when_it_fits(capsys):
    for preset in shipped_presets():
        assert plan(preset=preset, json_out=True, overrides=["run.trials=10"]) == 0
        capsys.readouterr()


@pytest.mark.parametrize("islands", [2, 3, 7])
@pytest.mark.parametrize(("compression", "block"), [("int8", 128), ("int4", 64), ("bf16", 128)])
def test_a_fleet_exchange_is_the_all_gather_the_fleet_sends(islands, compression, block):
    """Each member sends its message (fleet/compress.py's message_bytes, which fleet/member.py
    asserts before sending) to every other member."""
    raw = {
        "model": {"params": 1_000_003, "tokens": 1e9, "batch_tokens": 1e5},
        "hardware": {"profile": "h100", "chips": 8 * islands, "islands": islands,
                     "inter_island_gbit_s": 8},  # 1e9 bytes per second
        "strategy": {"kind": "fleet", "compression": compression, "block": block},
    }  # fmt: skip
    costs = derive(build(raw))
    sent = (islands - 1) * message_bytes(1_000_003, compression, block)
    assert costs.bytes_per_unit == sent
    assert costs.exchange_s == pytest.approx(sent / 1e9, rel=1e-12)


def test_an_odd_block_is_refused_with_int4_as_the_fleet_refuses_it():
    raw = {"hardware": {"islands": 2, "chips": 2048}, "strategy": {"kind": "fleet",
           "compression": "int4", "block": 63}}  # fmt: skip
    with pytest.raises(PlanError, match="strategy.block = 63: must be even"):
        build(raw)


def fleet_fit(islands=3, exchange_s=2.0, bytes_per_island=4e6, mtbf_hours=0.01) -> dict:
    return {
        "layout": "fleet",
        "islands": islands,
        "fitted": {
            "step_s": 0.1,
            "inner_steps": 10,
            "exchange_s": exchange_s,  # a round's seconds outside its steps
            "bytes_per_island": bytes_per_island,
            "link_bytes_per_s": 4e6,
            "mtbf_island_hours": mtbf_hours,
            "recovery_s": 5.0,
        },
    }


def test_a_fit_predicts_its_own_shape_back_and_moves_the_all_gather_with_the_islands():
    fit = fleet_fit()
    same = predict(fit, 3, 100, 1.0)
    # 2 messages of 2e6 bytes at 4e6 bytes/s: 1 s of the 2 s around the steps is the all-gather;
    # with 5 islands it is 4 messages, 2 s, so a failure-free round takes 1 + 1 + 2 = 4 s.
    calm = predict(fleet_fit(mtbf_hours=1e9), 5, 100, 1.0)
    assert calm["wall_s"] == pytest.approx(100 * 4.0, rel=1e-6)
    assert calm["goodput"] == pytest.approx(1.0 / 4.0, rel=1e-6)
    assert calm["interruptions"] == pytest.approx(0, abs=1e-3)
    stormier = predict(fit, 3, 100, 4.0)
    assert stormier["interruptions"] > 3 * same["interruptions"] > 0
    assert stormier["goodput"] < same["goodput"]
    with pytest.raises(ValueError, match="islands 1"):
        predict(fit, 1, 100, 1.0)
