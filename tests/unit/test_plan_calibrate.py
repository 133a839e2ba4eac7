"""Calibration on hand-written run directories predicts those runs back."""

import json
from pathlib import Path

import pytest

from ostinato.plan.calibrate import _steps_per_round, calibrate_run, model_size
from ostinato.plan.command import plan
from ostinato.plan.errors import PlanError

pytestmark = pytest.mark.timeout(60)

CONFIG = """
[model]
dim = 64
n_layers = 2
n_heads = 2
n_kv_heads = 1
ffn_dim = 192
vocab_size = 512
max_seq_len = 256
[train]
steps = 600
batch_size = 8
grad_accum = 1
[data]
seq_len = 128
"""
COMPUTE, OVERHEAD, STALL, RECOVERY, TOKENS = 0.1, 0.01, 0.2, 3.0, 1024


def row(step: int, stall: float = 0.0, recovery: float = 0.0, compute: float = COMPUTE) -> dict:
    step_s = compute + OVERHEAD + stall + recovery
    return dict(step=step, loss=2.0, lr=1e-3, grad_norm=1.0, tokens_per_s=TOKENS / step_s,
                step_s=step_s, compute_s=compute, checkpoint_stall_s=stall, recovery_s=recovery,
                tokens=TOKENS)  # fmt: skip


def write_island(path: Path, rows: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(CONFIG)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def island_rows() -> list[dict]:
    """600 steps, a checkpoint every 50; crashes 25 steps after the checkpoints at 100, 300 and
    450 roll back to them, so steps 101-125, 301-325 and 451-475 run twice."""
    rows, step, crashes = [], 1, {125: 100, 325: 300, 475: 450}
    while step <= 600:
        rows.append(row(step, stall=STALL if step % 50 == 0 else 0.0))
        if step in crashes:
            step = crashes.pop(step)
            rows.append(row(step + 1, recovery=RECOVERY))
            step += 1
        step += 1
    return rows


def test_model_size_counts_llama_parameters(tmp_path):
    (tmp_path / "config.toml").write_text(CONFIG)
    params, fpt = model_size(tmp_path / "config.toml")
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192 + 2 * 64
    assert params == 2 * 512 * 64 + 2 * per_layer + 64
    assert fpt == 6 * params + 6 * 2 * 128 * 64


def test_island_run_is_predicted_back(tmp_path):
    write_island(tmp_path, island_rows())
    result = calibrate_run(str(tmp_path))
    measured, predicted = result["measured"], result["predicted"]
    assert result["fitted"]["step_s"] == pytest.approx(COMPUTE + OVERHEAD)  # the step's span
    assert result["fitted"]["recovery_s"] == pytest.approx(RECOVERY)
    assert result["fitted"]["checkpoint_s"] == pytest.approx(STALL)
    assert measured["interruptions"] == 3
    assert predicted["goodput"] == pytest.approx(measured["goodput"], abs=0.05)
    assert predicted["wall_s"] == pytest.approx(measured["wall_s"], rel=0.05)


def test_island_goodput_file_is_the_measurement_and_its_gaps_are_idle(tmp_path):
    # The run saw 0.02 s between each pair of steps that metrics.jsonl does not hold.
    rows = island_rows()
    steps_s = sum(r["step_s"] for r in rows)
    island_s = steps_s + 0.02 * len(rows)
    kept = 600 * (COMPUTE + OVERHEAD)
    goodput = kept / island_s
    write_island(tmp_path, rows)
    recorded = {"wall_s": island_s, "island_s": island_s, "goodput": goodput}
    (tmp_path / "goodput.json").write_text(json.dumps(recorded))
    result = calibrate_run(str(tmp_path))
    assert result["measured"] == {"wall_s": island_s, "goodput": goodput, "interruptions": 3}
    assert result["fitted"]["idle_s"] == pytest.approx(0.02)
    assert result["predicted"]["goodput"] == pytest.approx(goodput, abs=0.02)
    assert result["predicted"]["wall_s"] == pytest.approx(island_s, rel=0.03)


def write_fleet(root: Path, with_goodput: bool) -> None:
    """Islands a, b, c; 20 rounds of H = 10; b crashes 5 steps into round 8 and rejoins at 10."""
    rounds, per_island = [], {name: [] for name in "abc"}
    for r in range(20):
        members = ["a", "c"] if r in (8, 9) else ["a", "b", "c"]
        for name in "abc":
            steps = per_island[name]
            count = 5 if name == "b" and r == 8 else 10 if name in members else 0
            for i in range(count):
                healed = name == "b" and r == 10 and i == 0
                steps.append(row(len(steps) + 1, recovery=RECOVERY if healed else 0.0))
        rounds.append(dict(round=r, attempt=0, members=members, bytes_sent=2e6, exchange_s=0.5,
                           tokens=10 * TOKENS, digest="x"))  # fmt: skip
    for name, rows in per_island.items():
        write_island(root / name, rows)
    (root / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    if with_goodput:
        recorded = {"wall_s": 40.0, "island_s": 80.0, "goodput": 0.97, "seconds": {}}
        (root / "goodput.json").write_text(json.dumps(recorded))


def test_fleet_run_is_predicted_back(tmp_path):
    write_fleet(tmp_path, with_goodput=False)
    result = calibrate_run(str(tmp_path))
    fitted, measured, predicted = result["fitted"], result["measured"], result["predicted"]
    assert result["layout"] == "fleet" and result["islands"] == 3
    assert fitted["inner_steps"] == 10
    assert fitted["link_bytes_per_s"] == pytest.approx(4e6)
    assert measured["interruptions"] == 1
    assert predicted["goodput"] == pytest.approx(measured["goodput"], abs=0.05)
    assert predicted["wall_s"] == pytest.approx(measured["wall_s"], rel=0.1)


def test_fleet_goodput_file_is_the_measurement(tmp_path):
    write_fleet(tmp_path, with_goodput=True)
    assert calibrate_run(str(tmp_path))["measured"] == {
        "wall_s": 40.0, "goodput": 0.97, "interruptions": 1}  # fmt: skip


def test_fleet_as_the_coordinator_writes_it(tmp_path):
    # bytes_sent per member, and commit times: 20 rounds 2.0 s apart, of which 1.1 s are steps.
    write_fleet(tmp_path, with_goodput=False)
    path = tmp_path / "rounds.jsonl"
    rounds = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rounds:
        r["bytes_sent"] = {m: 2e6 for m in r["members"]}
        r["time"] = 1000.0 + 2.0 * r["round"] + (0.5 if r["round"] == 9 else 0.0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rounds))
    fitted = calibrate_run(str(tmp_path))["fitted"]
    assert fitted["round_period_s"] == pytest.approx(2.0)  # the median ignores round 9's delay
    assert fitted["exchange_s"] == pytest.approx(2.0 - 10 * (COMPUTE + OVERHEAD))
    assert fitted["link_bytes_per_s"] == pytest.approx(4e6)
    rounds[0]["bytes_sent"] = {"a": "many"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rounds))
    with pytest.raises(PlanError, match="bytes_sent"):
        calibrate_run(str(tmp_path))


def test_calibrate_command_prints_json(tmp_path, capsys):
    write_island(tmp_path, island_rows())
    assert plan(calibrate=str(tmp_path), json_out=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"fitted", "measured", "predicted"} <= out.keys()


def test_not_a_run_dir_is_refused(tmp_path):
    with pytest.raises(PlanError, match="metrics.jsonl"):
        calibrate_run(str(tmp_path))
    write_island(tmp_path, [{"step": 1}])
    with pytest.raises(PlanError, match="missing step_s"):
        calibrate_run(str(tmp_path))


def span(island: str, kind: str, start: float, end: float) -> dict:
    return {"type": "span", "island": island, "kind": kind, "start": start, "end": end}


def test_fleet_deaths_and_their_cost_come_from_the_islands_events(tmp_path):
    """A fleet island's metrics hold no recovery rows (a restart drops its predecessor's rows
    after the last checkpoint): deaths are read from events.jsonl, down until recovery ends."""
    write_fleet(tmp_path, with_goodput=False)
    for name in "abc":
        rows = [row(i + 1) for i in range(200)]  # no recovery anywhere
        write_island(tmp_path / name, rows)
        events = [span(name, "compute", 0.0, 10.0)]
        if name == "b":  # dies at 10, down until 14, recovers until 16
            events += [{"type": "mark", "island": "b", "kind": "fault", "time": 11.0,
                        "label": "crash injected"}]  # fmt: skip
            events += [span("b", "recovery", 14.0, 16.0)]
        events += [span(name, "compute", 16.0, 30.0)]
        (tmp_path / name / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    result = calibrate_run(str(tmp_path))
    assert result["measured"]["interruptions"] == 1
    assert result["fitted"]["recovery_s"] == pytest.approx(6.0)


def test_on_a_time_budget_a_slow_island_runs_fewer_steps(tmp_path):
    write_island(tmp_path / "a", [row(1)])
    assert _steps_per_round([tmp_path / "a"], [0.1, 0.3], 10) == [10, 10]  # a step budget: H
    (tmp_path / "a" / "config.toml").write_text(CONFIG + '[fleet]\nbudget = "seconds:1.0"\n')
    assert _steps_per_round([tmp_path / "a"], [0.1, 0.3], 10) == [10, 4]  # steps until past T
