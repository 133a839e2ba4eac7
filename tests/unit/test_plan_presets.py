"""Presets reproduce the figures their sources published, within the stated margins."""

import json

import pytest

from ostinato.plan.chips import load_profile
from ostinato.plan.command import plan

pytestmark = pytest.mark.timeout(60)


def run_json(capsys, **kw) -> dict:
    assert plan(json_out=True, **kw) == 0
    return json.loads(capsys.readouterr().out)


def test_llama3_405b(capsys):
    # arXiv 2407.21783: 419 unexpected interruptions in 54 days, over 90% effective training time.
    r = run_json(capsys, preset="llama3-405b")
    assert r["time_to_train_hours"] / 24 == pytest.approx(54, rel=0.05)
    assert r["interruptions"] == pytest.approx(419, rel=0.10)
    assert 0.90 <= r["goodput"] <= 0.97
    assert r["checkpoint_interval_s"] == pytest.approx(r["checkpoint_interval_daly_s"])


def test_torchft_l40s(capsys):
    # PyTorch blog: ~1,100 failures, 82.3% of steps committed, 81.2% training efficiency.
    r = run_json(capsys, preset="torchft-l40s")
    assert r["interruptions"] == pytest.approx(1100, rel=0.10)
    assert r["rounds_committed"] == pytest.approx(0.823, abs=0.03)
    assert r["goodput"] == pytest.approx(0.812, rel=0.10)


def test_r2_on_ascend_sweep(capsys):
    rows = run_json(capsys, preset="r2-on-ascend")["sweep"]
    assert len(rows) == 6
    by = {(r["point"]["strategy.kind"], r["point"]["reliability.chip_mtbf_hours"]): r for r in rows}
    for mtbf in (50000, 10000, 5000):
        assert by["fleet", mtbf]["goodput"] > by["sync", mtbf]["goodput"]
        assert by["fleet", mtbf]["time_to_train_hours"] < by["sync", mtbf]["time_to_train_hours"]
    # Fleets lose little as chips get worse; synchronous training loses a lot.
    assert by["fleet", 5000]["goodput"] > 0.95 > 0.80 > by["sync", 5000]["goodput"]


def test_cloudmatrix_profile_adds_up_to_the_supernode():
    # arXiv 2506.12708 / SemiAnalysis: 384 chips, 300 PFLOP/s bf16, 49.2 TB HBM, ~559 kW.
    p = load_profile("cloudmatrix-384")
    assert 384 * p.peak_flops == pytest.approx(300e15, rel=0.01)
    assert 384 * p.memory_bytes == pytest.approx(49.2e12, rel=0.01)
    assert 384 * p.power_w == pytest.approx(559e3, rel=0.01)


def test_preset_fields_can_be_overridden(capsys):
    r = run_json(capsys, preset="llama3-405b", overrides=["hardware.chips=8192"],
                 deadline_hours=24 * 120, price_per_chip_hour=2.0)  # fmt: skip
    assert r["chips"] == 8192
    assert r["p_finish_by_deadline"] == 1.0
    assert r["cost"] == pytest.approx(r["chip_hours"] * 2.0)
