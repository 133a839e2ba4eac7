"""`ostinato chaos` on a local fleet of real processes: every fault kind is caught by the guard
meant for it, the survivors end bit-identical, and a bad schedule is refused before any start."""

import json

import pytest

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.store import committed_checkpoints, verify

from typer.testing import CliRunner

from ostinato.cli import app
from tests.conftest import TINY
from tests.dist.fleet_helpers import FAST, Running, final_digests, ostinato, rounds

pytestmark = pytest.mark.timeout(400)

# Rounds of 0.8 s: long enough for a killed island to restart and rejoin before the end.
FLEET = [
    "--fleet.budget=seconds:0.8",
    "--fleet.rounds=22",
    "--checkpoint.every=5",
    "--fleet.heartbeat_s=0.2",
    "--fleet.heartbeat_timeout_s=3",
    "--fleet.timeout_s=5",
    "--fleet.grace_s=2",
]
EVERY_KIND = (
    "crash@island=b,round=3; hang@island=c,round=6; nan@island=a,step=12; "
    "bitflip@island=c,round=14; link@island=a,round=10,bandwidth=2mbit; "
    "slow@island=b,round=16,factor=4; spike@island=a,step=80,window=2"
)


def chaos(out, faults: str, *extra: str) -> Running:
    command = ostinato("chaos", "--config", str(TINY), "--out", str(out), "--islands", "3")
    return Running([*command, "--faults", faults, *FLEET, *extra])


def test_every_fault_kind_is_caught_by_its_guard_and_the_survivors_agree(tmp_path):
    out = tmp_path / "chaos"
    run = chaos(out, EVERY_KIND)
    assert run.wait(360) == 0, run.output[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    caught = {row["kind"]: row for row in report["faults"]}
    assert set(caught) == {"crash", "hang", "nan", "bitflip", "link", "slow", "spike"}
    expected_guard = {
        "crash": ("heartbeat",),
        "hang": ("heartbeat",),
        "nan": ("nonfinite",),
        "bitflip": ("digest", "pseudo_gradient"),
        "link": ("link",),
        "slow": ("straggler",),
        "spike": ("spike",),
    }
    for kind, row in caught.items():
        assert row["guard"] in expected_guard[kind], row
        assert row["detected_at"] >= row["injected_at"] - 0.5, row
        assert set(row) >= {"kind", "island", "injected_at", "detected_at", "action"}
        assert row["seconds_lost"] is not None and row["seconds_lost"] >= 0, row
    # a hang is detected within the heartbeat timeout, plus the supervisor's poll
    assert caught["hang"]["detected_at"] - caught["hang"]["injected_at"] < 10
    assert report["parameters_identical"] is True
    assert 0 < report["goodput"] <= 1
    assert len(set(final_digests(out, ["a", "b", "c"]).values())) == 1
    quarantined = [r["round"] for r in rounds(out) if "c" in r.get("quarantined", [])]
    assert quarantined, "the bit flip's island was never quarantined"


def test_a_bit_flip_with_the_fleet_guards_off_poisons_every_island(tmp_path):
    """The guard is what saves the run: without it the flipped value reaches the average."""
    out = tmp_path / "chaos"
    run = chaos(
        out,
        "bitflip@island=c,round=3",
        "--guards.fleet_digest=false",
        "--guards.outlier_ratio=0",
        "--fleet.rounds=8",
    )
    assert run.wait(360) == 1, run.output[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    [row] = report["faults"]
    assert row["detected_at"] is None and report["parameters_identical"] is False
    # the flipped value (about 1e36, or inf) reached island a, which was never hit itself
    largest = max(p.abs().max() for p in load_trained(out / "a").model.parameters())
    assert not largest < 1e30, f"island a's largest parameter is {largest}"


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        ("melt@island=a,step=3", "unknown fault kind 'melt'"),
        ("crash@island=z,step=3", "island 'z' does not exist"),
        ("storm:mtbf=1s,seed=1,kinds=crash", "could never leave a quorum"),
        ("crash@island=b", "crash needs step= or round="),
    ],
)
def test_a_bad_schedule_is_refused_before_anything_starts(tmp_path, faults, message):
    # In process (typer's runner): the schedule is refused before any process would start.
    result = CliRunner().invoke(
        app,
        [
            "chaos",
            "--config",
            str(TINY),
            "--out",
            str(tmp_path / "chaos"),
            "--islands",
            "3",
            "--faults",
            faults,
            *FAST,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "chaos").exists()


@pytest.mark.parametrize(
    ("seconds", "seed", "rounds", "least_kills"),
    [
        (40, 3, 40, 6),
        pytest.param(
            240, 1, 320, 30, marks=[pytest.mark.slow, pytest.mark.timeout(1500)], id="thirty-kills"
        ),
    ],
)
def test_random_kills_lose_no_checkpoint_and_land_near_the_fault_free_run(
    tmp_path, seconds, seed, rounds, least_kills
):
    """A storm of SIGKILLs, one every 5 s on average (some land mid-checkpoint: every 5 steps).

    The suite runs a 40 s storm (7 kills for its seed); `pytest -m slow` runs the issue's 30 (a
    240 s storm of 32 kills: the storm leaves out kills that would break the quorum, so it takes
    that long; plus the fault-free fleet).

    Tolerance: within 10% of the fault-free fleet's validation loss, not bit-identical. A fleet
    commits each round with the islands that reach it, so every kill changes which pseudo-
    gradients are averaged (a killed island's round is left out, and it redoes the steps since
    its last checkpoint on data the fault-free run saw once); only a lone island's resume is
    bit-exact (tests/integration/test_resume.py).
    """
    out = tmp_path / "chaos"
    fleet = [
        "--fleet.budget=seconds:0.5",
        f"--fleet.rounds={rounds}",  # outlasts the storm, so every kill strikes
        "--fleet.min_islands=1",
        "--checkpoint.every=5",
        "--fleet.heartbeat_s=0.2",
        "--fleet.heartbeat_timeout_s=3",
        "--fleet.timeout_s=5",
        "--fleet.grace_s=1",
        "--train.steps=400",
        "--train.eval_problems=0",
        "--train.samples=0",
    ]
    command = ostinato("chaos", "--config", str(TINY), "--out", str(out), "--islands", "3")
    storm = f"storm:mtbf=5s,seed={seed},kinds=crash,duration={seconds}s"
    run = Running([*command, "--faults", storm, "--compare", *fleet])
    assert run.wait(1200) == 0, run.output[-4000:]
    report = json.loads((out / "chaos.json").read_text())
    kills = [r for r in report["faults"] if r["kind"] == "crash" and r["injected_at"] is not None]
    assert len(kills) >= least_kills, len(kills)
    assert all(r["detected_at"] is not None for r in kills)
    for island in "abc":
        committed = committed_checkpoints(out / island / "checkpoints")
        assert committed and all(verify(path) is None for path in committed), island
    assert report["parameters_identical"] is True
    loss, reference = report["final_loss"], report["reference_loss"]
    assert abs(loss - reference) / reference < 0.10, (loss, reference)
