"""Joining by challenge-response, the public log and the store kept small, the progress guard and
a heal refused for its MAC: the coordinator alone, driven tick by tick (tests/unit/
test_coordinator.py plays the islands the same way)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from torch import nn

from ostinato.config import ConfigError, load_config
from ostinato.fleet import wire
from ostinato.fleet.coordinator import KEPT_ROUNDS, Coordinator
from ostinato.fleet.guards import read_guard_log
from ostinato.fleet.member import FleetMember
from ostinato.fleet.membership import MAX_KNOCK_BYTES
from tests.unit.test_coordinator import (
    FINGERPRINT,
    HB_TIMEOUT,
    Island,
    commit_round,
    decided,
    drive,
    fleet_cfg,
    knock_in,
    planned,
)

pytestmark = pytest.mark.timeout(60)
PROGRESS_TIMEOUT = 1.0  # > HB_TIMEOUT, as the config demands


@pytest.fixture
def make_coordinator(tmp_path):
    def make(**overrides: Any) -> Coordinator:
        overrides.setdefault("progress_timeout_s", PROGRESS_TIMEOUT)
        coordinator = Coordinator("127.0.0.1:0", fleet_cfg(**overrides), tmp_path)
        coordinator.slow_tick_s = 0.0  # every tick does everything: the tests step it by hand
        return coordinator

    return make


def fired(tmp_path, guard: str) -> list[dict[str, Any]]:
    return [g for g in read_guard_log(tmp_path) if g["guard"] == guard]


# --- joining ----------------------------------------------------------------------------------


def test_a_recorded_join_replayed_later_is_refused(make_coordinator):
    coordinator = make_coordinator()
    island = Island(coordinator, "a")
    assert island.knock(coordinator)["ok"] is True
    recorded = json.dumps(island.answer)  # what an eavesdropper saw on the public log
    first = island.nonce
    island.public.delete(f"reply/a/{first}")  # read and deleted, as membership.knock does
    time.sleep(HB_TIMEOUT + 0.05)  # the island died: its name is free again
    island.post(recorded + "\n")
    coordinator.tick()
    reply = island.public.get(f"reply/a/{first}")
    assert reply is not None and reply["ok"] is False and "challenge" in reply["reason"]
    assert not coordinator._is_alive(coordinator.islands["a"])  # not brought back by the replay
    # a restarted coordinator has issued no challenge at all: refused there too
    second = make_coordinator()
    island.connect(second)
    island.post(recorded + "\n")
    second.tick()
    assert island.public.get(f"reply/a/{first}")["ok"] is False
    assert second.islands == {}


def test_an_answer_to_another_islands_challenge_is_refused(make_coordinator):
    coordinator = make_coordinator()
    victim, thief = Island(coordinator, "a"), Island(coordinator, "b")
    nonce, challenge = victim.challenge(coordinator)
    # b answers a's challenge under the right token: the challenge belongs to (a, nonce)
    answer = {"island": "b", "nonce": nonce, "challenge": challenge, "round_have": 0}
    answer["mac"] = wire.join_mac("t", answer)
    thief.post(json.dumps(answer) + "\n")
    coordinator.tick()
    assert thief.public.get(f"reply/b/{nonce}")["ok"] is False
    assert coordinator.islands == {}


def test_a_wrong_mac_spends_the_challenge(make_coordinator):
    coordinator = make_coordinator()
    island = Island(coordinator, "a")
    assert island.knock(coordinator, mac_token="guess")["ok"] is False
    # the same answer with the right MAC now finds its challenge spent
    answer = {k: v for k, v in island.answer.items() if k != "mac"}
    answer["mac"] = wire.join_mac("t", answer)
    island.public.delete(f"reply/a/{island.nonce}")
    island.post(json.dumps(answer) + "\n")
    coordinator.tick()
    assert "challenge" in island.reply()["reason"] and coordinator.islands == {}


def test_the_public_log_is_compacted_and_bounded(make_coordinator):
    coordinator = make_coordinator()
    islands = [Island(coordinator, name) for name in "abcd"]
    for island in islands:
        assert island.knock(coordinator)["ok"] is True
    assert coordinator.public.view.get(wire.KNOCK) == b""  # every knock read, then dropped
    assert not coordinator.public.has("challenge/a/" + islands[0].nonce)  # spent, deleted
    # junk without a newline stays (it may be a knock's first half) until it is too long
    junk = Island(coordinator, "x")
    junk.post("x" * 100)
    coordinator.tick()
    assert coordinator.public.view.get(wire.KNOCK) == b"x" * 100
    junk.post("x" * MAX_KNOCK_BYTES)
    coordinator.tick()
    assert coordinator.public.view.get(wire.KNOCK) == b""
    assert Island(coordinator, "e").knock(coordinator)["ok"] is True


def test_keys_of_finished_rounds_are_deleted(make_coordinator):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    counts = []
    for number in range(1, 7):
        commit_round(coordinator, [a, b], number)
        counts.append(coordinator.store.num_keys())
    # each round leaves a record, two ready marks and two results; those of rounds committed
    # KEPT_ROUNDS ago go, so from then on the store stops growing
    assert counts[KEPT_ROUNDS:] == [counts[KEPT_ROUNDS]] * (len(counts) - KEPT_ROUNDS)
    for number in range(1, 7 - KEPT_ROUNDS):
        assert coordinator.keys.get(f"round/{number}") is None
        assert not coordinator.keys.has(f"ready/{number}/a")
        assert not coordinator.keys.has(f"result/{number}/0/b")
    assert coordinator.keys.get(f"round/{6 - KEPT_ROUNDS + 1}")["decision"] == "commit"


# --- progress ---------------------------------------------------------------------------------


def beat(island: Island, step: int, state: str = "training") -> None:
    island.keys.put(f"hb/{island.name}", {"state": state, "n": island.beats, "step": step})
    island.beats += 1


def test_an_island_that_beats_but_makes_no_step_is_stalled(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    started, steps = time.monotonic(), 0
    while not fired(tmp_path, "progress"):
        steps += 1
        beat(a, steps)  # a steps on
        beat(b, 7)  # b's heartbeat thread beats on, its step is stuck
        coordinator.tick()
        assert time.monotonic() - started < PROGRESS_TIMEOUT + 5.0, "no progress guard"
        time.sleep(0.02)
    waited = time.monotonic() - started
    [event] = fired(tmp_path, "progress")
    assert event["island"] == "b" and event["step"] == 7
    # the clock starts at b's first beat, after its knock: never before the timeout
    assert PROGRESS_TIMEOUT <= event["silent_s"] <= waited
    assert fired(tmp_path, "heartbeat") == []  # it beats: the heartbeat guard sees nothing
    assert coordinator._alive() == ["a"]
    assert coordinator.keys.get("status")["islands"][1]["state"] == "stalled"
    # b is dead for rounds: round 1 is planned with a alone, without waiting for b
    a.ready(1)
    b.ready(1)
    rec = drive(coordinator, [], planned(coordinator, 1, 0))
    assert rec["members"] == ["a"]
    # a stalled island that steps again counts again
    beat(b, 8)
    coordinator.tick()
    assert coordinator._alive() == ["a", "b"]
    assert len(fired(tmp_path, "progress")) == 1


@pytest.mark.parametrize("state", ["syncing", "recovering", "starting", "done"])
def test_no_step_outside_training_is_not_a_stall(make_coordinator, tmp_path, state):
    coordinator = make_coordinator()
    a = Island(coordinator, "a")
    a.knock(coordinator)
    started = time.monotonic()
    while time.monotonic() - started < PROGRESS_TIMEOUT * 1.5:
        beat(a, 3, state)
        coordinator.tick()
        time.sleep(0.02)
    assert fired(tmp_path, "progress") == []
    # back to training at the same step: the clock starts again there
    beat(a, 3)
    coordinator.tick()
    assert fired(tmp_path, "progress") == [] and coordinator._alive() == ["a"]


def test_progress_timeout_must_exceed_the_heartbeat_timeout():
    with pytest.raises(ConfigError, match="fleet.progress_timeout_s"):
        load_config(None, ["fleet.heartbeat_timeout_s=5", "fleet.progress_timeout_s=5"])
    assert load_config(None, []).fleet.progress_timeout_s > 5.0


def test_the_exchange_deadline_must_end_before_the_progress_guard_fires():
    """collective (fleet.timeout_s) < exchange deadline (+ 5 s) < progress: the order in which
    the fleet's timeouts may fire (config._check_timeout_order)."""
    with pytest.raises(ConfigError, match=r"fleet.timeout_s \+ 5 \(25, the exchange deadline\)"):
        load_config(None, ["fleet.timeout_s=20", "fleet.progress_timeout_s=25"])
    assert load_config(None, ["fleet.timeout_s=20", "fleet.progress_timeout_s=26"])


# --- a heal refused for its MAC ---------------------------------------------------------------


def test_a_heal_that_fails_its_mac_is_the_donors_fault_and_comes_from_another(
    make_coordinator, tmp_path
):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    commit_round(coordinator, [a, b], 1)
    c = Island(coordinator, "c")
    assert c.knock(coordinator)["role"] == "joiner"
    done = commit_round(coordinator, [a, b], 2)
    assert [(h["island"], h["donor"]) for h in done["heal"]] == [("c", "a")]
    # the state a sent arrived changed: c refuses it and says so
    c.keys.put(f"healbad/c/{c.nonce}", {"round": 2, "donor": "a"})
    drive(coordinator, [a, b, c], lambda: coordinator.islands["c"].role == "joiner")
    [event] = fired(tmp_path, "mac")
    assert event["island"] == "a" and event["receiver"] == "c" and event["round"] == 2
    assert not c.keys.has(f"healbad/c/{c.nonce}")
    # c is not a member of round 3; its commit heals it again, from b
    for island in (a, b, c):
        island.ready(3)
    rec = drive(coordinator, [a, b, c], planned(coordinator, 3, 0))
    assert rec["members"] == ["a", "b"]
    a.result(3, 0)
    b.result(3, 0)
    done = drive(coordinator, [a, b, c], decided(coordinator, 3, 0))
    assert [(h["island"], h["donor"]) for h in done["heal"]] == [("c", "b")]
    assert done["checkpoint_by"] in (None, "a")  # the fleet checkpoint's writer is unchanged


def joined_member(coordinator: Coordinator, name: str, fingerprint: dict[str, Any]):
    """A real FleetMember admitted by `coordinator` (ticked while it knocks)."""
    cfg = fleet_cfg(coordinator=f"127.0.0.1:{coordinator.port}", island=name)
    member = FleetMember(cfg, nn.Linear(2, 2), fingerprint)
    knock_in(coordinator, member)
    return member


@pytest.mark.parametrize("healed_at_the_end", [False, True])
def test_a_joiner_the_final_round_does_not_heal_ends_with_the_final_fleet_checkpoint(
    make_coordinator, healed_at_the_end
):
    """A joiner silent past the heartbeat timeout when the final round commits is healed by no
    one (seen after a coordinator restart: admitted again, not yet beating). It must not wait
    for a heal order for ever: once the fleet has finished it restores the final fleet
    checkpoint and ends. A joiner the final round does heal still waits for its donor."""
    two_rounds = {**FINGERPRINT, "rounds": 2}
    coordinator = make_coordinator(progress_timeout_s=60.0)  # the fake a beats no steps
    a = Island(coordinator, "a")
    a.knock(coordinator, fingerprint=two_rounds)
    commit_round(coordinator, [a], 1)
    c = joined_member(coordinator, "c", two_rounds)
    assert c.role == "joiner"
    if healed_at_the_end:
        c.keys.put("hb/c", {"state": "recovering", "n": 0})
    else:  # c says nothing until the heartbeat timeout has passed; a beats
        silent_until = time.monotonic() + 2 * HB_TIMEOUT
        while time.monotonic() < silent_until:
            a.beat()
            coordinator.tick()
            time.sleep(0.01)
    final = commit_round(coordinator, [a], 2)
    assert final["final"] and coordinator.finished
    assert [h["island"] for h in final["heal"]] == (["c"] if healed_at_the_end else [])
    restored = []

    def final_fleet_checkpoint() -> bool:  # FleetIsland.restore_shards, as _catch_up calls it
        c.round_have = 2
        restored.append(2)
        return True

    c.restore_state = final_fleet_checkpoint
    ended: list[bool] = []
    waiting = threading.Thread(target=lambda: ended.append(c._heal()), daemon=True)
    waiting.start()
    deadline = time.monotonic() + 4.0  # the member reads the coordinator's status every 1 s
    while waiting.is_alive() and time.monotonic() < deadline:
        a.beat()
        coordinator.tick()
        time.sleep(0.01)
    if healed_at_the_end:  # its donor's order would come: it must still be waiting for it
        assert waiting.is_alive() and not restored
        coordinator.keys.delete("round/2")  # now no record names c: it ends, as above
        waiting.join(timeout=4.0)
    assert ended == [True] and restored == [2] and c.role == "finished"


def test_a_refused_pseudo_gradient_is_counted_against_its_sender(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    islands = [Island(coordinator, n) for n in "abc"]
    for island in islands:
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, islands, planned(coordinator, 1, 0))
    for island in islands:  # c's payload reached a and b changed: they left it out
        refused = ["c"] if island.name != "c" else []
        island.keys.put(
            f"result/1/0/{island.name}",
            {
                "ok": True,
                "digest": "d-without-c" if refused else "d-with-c",
                "bytes_sent": 10,
                "tokens": 100,
                "exchange_s": 0.2,
                "excluded": [],
                "refused": refused,
            },
        )
    done = drive(coordinator, islands, decided(coordinator, 1, 0))
    assert done["decision"] == "commit" and done["members"] == ["a", "b"]
    [event] = fired(tmp_path, "mac")
    assert event["island"] == "c" and event["receivers"] == ["a", "b"]
    logged = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert logged["refused"] == ["c"] and logged["quarantined"] == ["c"]
