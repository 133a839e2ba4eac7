"""Fleets of real processes on 127.0.0.1: crashes, a coordinator restart, a slow island,
a refused island, a resumed fleet, and an island of two torchrun ranks. Every survivor must end with the same parameters."""

import json
import shutil
import time

import pytest

from tests.dist.fleet_helpers import (
    FAST,
    Running,
    final_digests,
    fleet_local,
    free_port,
    island_pid,
    kill,
    ostinato,
    rank_pid,
    rounds,
    status,
    torchrun,
    wait_until,
)
from tests.conftest import TINY, run_cli

pytestmark = pytest.mark.timeout(300)


def test_an_island_killed_mid_exchange_recovers_from_a_donor(tmp_path):
    out = tmp_path / "fleet"
    # Island c's emulated link stretches its exchange to ~1 s, so a kill lands inside one.
    fleet = fleet_local(
        out,
        3,
        "--train.steps=200",
        "--fleet.budget=steps:10",
        "--fleet.slowdown=3",
        "--for",
        "c:fleet.link=latency=500ms",
    )
    address = fleet.wait_for_line("coordinator on").split("coordinator on ")[1].split(";")[0]
    wait_until(lambda: len(rounds(out)) >= 2, what="two committed rounds")

    def c_exchanging() -> bool:
        now = status(address)
        islands = {i["island"]: i for i in now.get("islands", [])}
        return now.get("phase") == "exchange" and islands.get("c", {}).get("state") == "syncing"

    wait_until(c_exchanging, what="island c in an exchange")
    killed_after = len(rounds(out))
    kill(island_pid("c"))
    assert fleet.wait() == 0, fleet.output[-4000:]

    log = rounds(out)
    assert [r["round"] for r in log] == list(range(1, 21))  # every round committed once
    without_c = [r for r in log if r["members"] == ["a", "b"]]
    assert without_c, f"no round committed by the survivors alone: {log}"
    assert without_c[0]["round"] == killed_after + 1
    assert without_c[0]["attempt"] >= 1  # the attempt c died in was aborted, then retried
    assert log[-1]["members"] == ["a", "b", "c"]  # c came back
    assert "healed from" in fleet.output
    digests = final_digests(out, ["a", "b", "c"])
    assert len(set(digests.values())) == 1, digests
    assert log[-1]["digest"]


def test_a_coordinator_restart_loses_no_round(tmp_path):
    out, port = tmp_path / "fleet", free_port()
    address = f"127.0.0.1:{port}"
    coordinator_args = (
        "fleet",
        "coordinator",
        "--bind",
        address,
        "--out",
        str(out),
        "--fleet.expect=2",
        *FAST,
    )
    coordinator = Running(ostinato(*coordinator_args))
    coordinator.wait_for_line("coordinator on")
    islands = [
        Running(
            ostinato(
                "train",
                "--config",
                str(TINY),
                "--out",
                str(out / name),
                "--train.steps=60",
                "--fleet.budget=steps:5",
                f"--fleet.coordinator={address}",
                f"--fleet.island={name}",
                "--fleet.slowdown=3",
                *FAST,
            )
        )
        for name in ("a", "b")
    ]
    wait_until(lambda: len(rounds(out)) >= 3, what="three committed rounds")
    coordinator.process.kill()
    coordinator.wait()
    time.sleep(1.0)
    coordinator = Running(ostinato(*coordinator_args))
    for island in islands:
        assert island.wait() == 0, island.output[-4000:]
    coordinator.process.terminate()
    numbers = [r["round"] for r in rounds(out)]
    assert numbers == list(range(1, 13)), numbers
    assert set(final_digests(out, ["a", "b"]).values()) == {rounds(out)[-1]["digest"]}


def test_a_slow_island_with_a_time_budget_does_not_make_the_fast_ones_wait(tmp_path):
    out = tmp_path / "fleet"
    fleet = fleet_local(
        out, 3, "--fleet.budget=seconds:1.0", "--fleet.rounds=4", "--for", "c:fleet.slowdown=3"
    )
    assert fleet.wait() == 0, fleet.output[-4000:]
    log = rounds(out)
    assert all(r["members"] == ["a", "b", "c"] for r in log)
    # The slow island did fewer inner steps, and is weighted by its tokens.
    assert all(r["tokens"]["c"] < r["tokens"]["a"] for r in log)
    grace = 2.0
    for name in ("a", "b"):
        events = [
            json.loads(line) for line in (out / name / "events.jsonl").read_text().splitlines()
        ]
        waits = [e["end"] - e["start"] for e in events if e.get("kind") == "waiting"]
        assert waits and max(waits) < grace, (name, waits)


def test_a_mismatched_island_is_refused_by_name(tmp_path):
    out = tmp_path / "fleet"
    fleet = fleet_local(
        out, 2, "--train.steps=20", "--fleet.budget=steps:10", "--for", "b:model.n_layers=3"
    )
    assert fleet.wait() == 1
    assert "refused island 'b'" in fleet.output
    assert "model.n_layers: fleet 2, island 3" in fleet.output


def test_an_unreachable_coordinator_is_a_clear_error(tmp_path):
    done = run_cli(
        "train",
        "--config",
        str(TINY),
        "--out",
        str(tmp_path / "a"),
        f"--fleet.coordinator=127.0.0.1:{free_port()}",
        "--fleet.connect_timeout_s=1",
        "--fleet.token=x",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not reachable" in done.stderr and "Traceback" not in done.stderr


def test_a_fleet_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "fleet"
    first = fleet_local(
        out, 2, "--train.steps=40", "--fleet.budget=steps:10", "--fleet.checkpoint_every=2"
    )
    assert first.wait() == 0, first.output[-3000:]
    assert (out / "fleet" / "checkpoints").is_dir()
    for name in ("a", "b"):  # the islands lost their disks: only the fleet checkpoint is left
        shutil.rmtree(out / name / "checkpoints")
    more = fleet_local(
        out,
        2,
        "--train.steps=60",
        "--fleet.budget=steps:10",
        "--fleet.checkpoint_every=2",
        "--resume",
        "auto",
    )
    assert more.wait() == 0, more.output[-3000:]
    assert "resumed from fleet checkpoint" in more.output
    assert [r["round"] for r in rounds(out)] == list(range(1, 7))
    assert set(final_digests(out, ["a", "b"]).values()) == {rounds(out)[-1]["digest"]}


def test_a_streaming_fleet_with_overlap_ends_on_the_same_parameters(tmp_path):
    """Streaming DiLoCo: two fragments, a round every H/2 steps, each exchange overlapped with two
    inner steps (cut short when a checkpoint is due: every 7 steps here)."""
    out = tmp_path / "fleet"
    fleet = fleet_local(
        out,
        2,
        "--train.steps=40",
        "--fleet.budget=steps:10",
        "--fleet.fragments=2",
        "--fleet.overlap=2",
        "--checkpoint.every=7",
    )
    assert fleet.wait() == 0, fleet.output[-4000:]
    log = rounds(out)
    assert [r["round"] for r in log] == list(range(1, 9))
    assert [r["fragment"] for r in log] == [0, 1, 0, 1, 0, 1, 0, None]  # None: the final, all
    assert all(r["members"] == ["a", "b"] for r in log)
    sent = [r["bytes_sent"]["a"] for r in log]
    assert max(sent[:-1]) < 0.6 * sent[-1]  # a fragment's round carries about half
    assert set(final_digests(out, ["a", "b"]).values()) == {log[-1]["digest"]}


def test_when_every_member_dies_the_fleet_goes_on_from_its_checkpoint(tmp_path):
    """Both islands killed at once: no donor is left, so a restarted island restores the fleet
    checkpoint and carries the fleet on; the other heals from it."""
    out = tmp_path / "fleet"
    fleet = fleet_local(
        out,
        2,
        "--train.steps=120",
        "--fleet.budget=steps:10",
        "--fleet.checkpoint_every=1",
        "--fleet.slowdown=3",
    )
    wait_until(lambda: len(rounds(out)) >= 3, what="three committed rounds")
    for name in ("a", "b"):
        kill(island_pid(name))
    assert fleet.wait() == 0, fleet.output[-4000:]
    assert "carries the fleet on" in fleet.output
    log = rounds(out)
    assert [r["round"] for r in log] == list(range(1, 13))
    assert log[-1]["members"] == ["a", "b"]
    assert set(final_digests(out, ["a", "b"]).values()) == {log[-1]["digest"]}


def test_a_torchrun_island_with_a_time_budget_loses_a_rank_and_rejoins(tmp_path):
    """Island a is two torchrun ranks, b one process; rounds of 0.5 s. a's rank 1 is SIGKILLed:
    b goes on alone, torchrun restarts a's ranks, a resumes, rejoins, and trains on in the
    fleet. Its ranks must agree on every round's end (their clocks differ) and hold the same
    parameters (the rank digest guard would repair a rank that did not)."""
    out, port = tmp_path / "fleet", free_port()
    address = f"127.0.0.1:{port}"
    coordinator = Running(
        ostinato("fleet", "coordinator", "--bind", address, "--out", str(out), *FAST)
    )
    coordinator.wait_for_line("coordinator on")
    run = ["--fleet.budget=seconds:0.5", "--fleet.rounds=60", "--checkpoint.every=5", *FAST]
    run += ["--guards.digest_every=5", f"--fleet.coordinator={address}"]

    def island(name: str) -> list[str]:
        command = ["train", "--config", str(TINY), "--out", str(out / name), *run]
        return [*command, f"--fleet.island={name}"]

    a = Running(torchrun(2, "-m", "ostinato", *island("a")))
    b = Running(ostinato(*island("b")))
    wait_until(lambda: len(rounds(out)) >= 3, what="three committed rounds")
    kill(rank_pid("a", 1))
    assert b.wait() == 0, b.output[-4000:]
    assert a.wait() == 0, a.output[-4000:]
    coordinator.process.terminate()
    log = rounds(out)
    assert [r["round"] for r in log] == list(range(1, 61))
    assert any(r["members"] == ["b"] for r in log), "b did not go on alone"
    # a's ranks restarted from its checkpoint and a took part in the fleet's last round: healed
    # from b, or as a member when it came back before b had committed a round without it.
    assert "resumed from" in a.output, a.output[-4000:]
    assert log[-1]["members"] == ["a", "b"]
    assert "repaired from rank" not in a.output
    assert set(final_digests(out, ["a", "b"]).values()) == {log[-1]["digest"]}
