"""The coordinator alone, on a real TCPStore on 127.0.0.1 (port 0), driven tick by tick.

The tests play the islands by writing the keys FleetMember writes (see member.py): knocks on the
public "knock" key, heartbeats, ready marks and results under the token's namespace.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist
from torch import nn

from ostinato.config import FleetConfig, GuardsConfig
from ostinato.fleet import wire
from ostinato.fleet.coordinator import Coordinator
from ostinato.fleet.guards import read_guard_log
from ostinato.fleet.joining import Refused
from ostinato.fleet.member import FleetMember

pytestmark = pytest.mark.timeout(60)

TOKEN = "t"
HB_TIMEOUT = 0.3  # also how long a fresh coordinator waits for islands before planning rounds
FINGERPRINT = {
    "model": {"dim": 64, "n_layers": 2, "vocab_size": 512},
    "tokenizer": "0123456789abcdef",
    "compression": "int8",
    "block": 128,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
    "rounds": 0,
}


def fleet_cfg(**overrides: Any) -> FleetConfig:
    settings: dict[str, Any] = dict(
        token=TOKEN,
        heartbeat_timeout_s=HB_TIMEOUT,
        grace_s=0.05,
        min_islands=1,
        expect=0,
        checkpoint_every=0,
        timeout_s=5.0,
        connect_timeout_s=5.0,
    )
    settings.update(overrides)
    return FleetConfig(**settings)


def client(coordinator: Coordinator) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", coordinator.port, is_master=False, timeout=timedelta(seconds=10)
    )


class Island:
    """One island, played by hand: writes what FleetMember writes."""

    def __init__(self, coordinator: Coordinator, name: str, token: str = TOKEN):
        self.name, self.token = name, token
        self.connect(coordinator)
        self.beats = 0
        self.nonce = ""

    def connect(self, coordinator: Coordinator) -> None:
        store = client(coordinator)
        self.keys = wire.Keys(store, wire.namespace(self.token))
        self.public = wire.Keys(store, "public")

    def post(self, data: str | bytes) -> None:
        """Append to the public knock log; the check after it returns once the store has done
        the append (one connection's requests are served in order), so the next tick sees it."""
        self.public.view.append(wire.KNOCK, data)
        self.public.view.check([wire.KNOCK])

    def challenge(self, coordinator: Coordinator) -> tuple[str, str]:
        """Knock and read the coordinator's challenge: (nonce, challenge)."""
        nonce = secrets.token_hex(8)
        hello = {"island": self.name, "nonce": nonce}
        self.post(json.dumps(hello) + "\n")
        coordinator.tick()
        issued = self.public.get(f"challenge/{self.name}/{nonce}")
        assert issued is not None, "the coordinator issued no challenge"
        return nonce, issued["challenge"]

    def send_knock(
        self,
        coordinator: Coordinator,
        round_have: int = 0,
        reconnect: bool = False,
        fingerprint: dict[str, Any] | None = None,
        mac_token: str | None = None,
        digest: str | None = None,
    ) -> str:
        """Knock, then answer the challenge (as membership.knock does); returns the nonce."""
        self.nonce, challenge = self.challenge(coordinator)
        self.answer = answer = {
            "island": self.name,
            "nonce": self.nonce,
            "challenge": challenge,
            "fingerprint": FINGERPRINT if fingerprint is None else fingerprint,
            "round_have": round_have,
            "reconnect": reconnect,
        }
        if digest is not None:
            answer["digest"] = digest
        answer["mac"] = wire.join_mac(self.token if mac_token is None else mac_token, answer)
        self.post(json.dumps(answer) + "\n")
        return self.nonce

    def reply(self, nonce: str | None = None) -> dict[str, Any] | None:
        return self.public.get(f"reply/{self.name}/{nonce or self.nonce}")

    def knock(self, coordinator: Coordinator, **kwargs: Any) -> dict[str, Any]:
        nonce = self.send_knock(coordinator, **kwargs)
        coordinator.tick()
        reply = self.reply(nonce)
        assert reply is not None, "the coordinator did not answer a knock"
        return reply

    def beat(self) -> None:
        self.keys.put(f"hb/{self.name}", {"state": "training", "n": self.beats})
        self.beats += 1

    def ready(self, number: int, tokens: int = 100, **sizes: Any) -> None:
        ready = {"tokens": tokens, "data": {"pos": number}, "nonce": self.nonce, **sizes}
        self.keys.put(f"ready/{number}/{self.name}", ready)

    def result(
        self,
        number: int,
        attempt: int,
        ok: bool = True,
        digest: str | None = "d1",
        tokens=100,
        excluded=(),
        exchange_s=0.25,
    ) -> None:
        self.keys.put(
            f"result/{number}/{attempt}/{self.name}",
            {
                "ok": ok,
                "digest": digest if ok else None,
                "bytes_sent": 1000 + len(self.name) if ok else 0,
                "tokens": tokens,
                "exchange_s": exchange_s,
                "excluded": list(excluded),
            },
        )


def record(coordinator: Coordinator, number: int) -> dict[str, Any] | None:
    return coordinator.keys.get(f"round/{number}")


def drive(coordinator: Coordinator, beating: list[Island], until, timeout: float = 5.0):
    """Tick the coordinator, with `beating` islands alive, until `until()` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for island in beating:
            island.beat()
        coordinator.tick()
        value = until()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("the coordinator did not get there in time")


def planned(coordinator: Coordinator, number: int, attempt: int):
    """The record of round `number` attempt `attempt`, once it is planned (no decision yet)."""

    def probe():
        rec = record(coordinator, number)
        if rec and rec["attempt"] == attempt and rec.get("decision") is None:
            return rec
        return None

    return probe


def decided(coordinator: Coordinator, number: int, attempt: int):
    def probe():
        rec = record(coordinator, number)
        if rec and rec["attempt"] == attempt and rec.get("decision"):
            return rec
        return None

    return probe


def commit_round(coordinator, islands, number, attempt=0, digest="d1"):
    """Every island ready for `number`; they all report ok with equal digests; it commits."""
    for island in islands:
        island.ready(number)
    rec = drive(coordinator, islands, planned(coordinator, number, attempt))
    assert rec["members"] == sorted(i.name for i in islands)
    for island in islands:
        island.result(number, attempt, digest=digest)
    done = drive(coordinator, islands, decided(coordinator, number, attempt))
    assert done["decision"] == "commit"
    return done


def knock_in(coordinator: Coordinator, member: FleetMember) -> None:
    """A real FleetMember knocks (in a thread) while the coordinator is ticked, until answered."""
    member._connect()
    thread = threading.Thread(target=member._knock, args=(False,), daemon=True)
    thread.start()
    while thread.is_alive():
        coordinator.tick()
        time.sleep(0.01)


def rounds_log(tmp_path) -> list[dict[str, Any]]:
    path = tmp_path / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- admission --------------------------------------------------------------------------------


def test_wrong_token_is_refused_with_a_reason(make_coordinator):
    coordinator = make_coordinator()
    intruder = Island(coordinator, "x")
    reply = intruder.knock(coordinator, mac_token="not-the-token")
    assert reply["ok"] is False
    assert "token" in reply["reason"]
    assert "x" not in coordinator.islands
    # an answer with no mac at all is refused the same way
    nonce, challenge = Island(coordinator, "y").challenge(coordinator)
    answer = {"island": "y", "nonce": nonce, "challenge": challenge}
    intruder.post(json.dumps(answer) + "\n")
    coordinator.tick()
    assert intruder.public.get(f"reply/y/{nonce}")["ok"] is False
    assert coordinator.islands == {}


def test_second_island_with_the_same_name_is_refused(make_coordinator):
    coordinator = make_coordinator()
    first, second = Island(coordinator, "a"), Island(coordinator, "a")
    assert first.knock(coordinator)["ok"] is True
    first.beat()
    reply = second.knock(coordinator)
    assert reply["ok"] is False
    assert "'a'" in reply["reason"] and "already" in reply["reason"]
    assert coordinator.islands["a"].nonce == first.nonce
    # once the first is gone (no heartbeat for heartbeat_timeout_s), the name is free again
    time.sleep(HB_TIMEOUT + 0.05)
    assert second.knock(coordinator)["ok"] is True


def test_mismatched_island_is_refused_naming_each_field(make_coordinator):
    coordinator = make_coordinator()
    assert Island(coordinator, "a").knock(coordinator)["ok"] is True
    other = {
        **FINGERPRINT,
        "model": {**FINGERPRINT["model"], "dim": 128},
        "tokenizer": "ffffffffffffffff",
        "compression": "int4",
    }
    reply = Island(coordinator, "b").knock(coordinator, fingerprint=other)
    assert reply["ok"] is False
    reason = reply["reason"]
    for name in ("model", "tokenizer", "compression"):
        assert name in reason
    for name in ("block", "outer_lr", "outer_momentum", "rounds"):
        assert f"{name}:" not in reason
    assert "'int4'" in reason and "'int8'" in reason and "ffffffffffffffff" in reason
    assert "b" not in coordinator.islands
    # one field differing is named alone
    reply = Island(coordinator, "c").knock(coordinator, fingerprint={**FINGERPRINT, "block": 64})
    assert reply["ok"] is False and "block" in reply["reason"]
    assert "model" not in reply["reason"]


def test_islands_warm_started_from_other_checkpoints_are_refused(make_coordinator):
    coordinator = make_coordinator()
    started = {**FINGERPRINT, "warm_start": "0123456789abcdef"}
    assert Island(coordinator, "a").knock(coordinator, fingerprint=started)["ok"] is True
    other = {**FINGERPRINT, "warm_start": "fedcba9876543210"}
    reply = Island(coordinator, "b").knock(coordinator, fingerprint=other)
    assert reply["ok"] is False and "warm_start" in reply["reason"]
    reply = Island(coordinator, "c").knock(coordinator, fingerprint=dict(FINGERPRINT))
    assert reply["ok"] is False and "warm_start" in reply["reason"]  # the seeded init


def test_malformed_knocks_are_ignored(make_coordinator):
    coordinator = make_coordinator()
    poker = Island(coordinator, "a")
    for line in (
        "this is not json",
        "{}",
        '{"island": "a"}',
        "[1, 2, 3]",
        '"a string"',
        "null",
        "42",
        '{"nonce": "n"}',
        "{",
        "",
    ):
        poker.post(line + "\n")
        coordinator.tick()
    assert coordinator.islands == {}
    reply = poker.knock(coordinator)
    assert reply == {"ok": True, "role": "member", "round": 1, "outer_lr": 0.7}


def test_invalid_utf8_on_the_knock_key_does_not_crash_the_coordinator(make_coordinator):
    coordinator = make_coordinator()
    poker = Island(coordinator, "a")
    poker.post(b"\xff\xfe not utf-8\n")
    coordinator.tick()
    assert poker.knock(coordinator)["ok"] is True


@pytest.mark.parametrize("field", ["round_have", "fingerprint"])
def test_authenticated_malformed_knock_does_not_crash_the_coordinator(make_coordinator, field):
    coordinator = make_coordinator()
    poker = Island(coordinator, "a")
    nonce, challenge = Island(coordinator, "z").challenge(coordinator)
    knock = {
        "island": "z",
        "nonce": nonce,
        "challenge": challenge,
        "fingerprint": FINGERPRINT,
        "round_have": 0,
        field: "two" if field == "round_have" else ["not", "an", "object"],
    }
    knock["mac"] = wire.join_mac(TOKEN, knock)
    poker.post(json.dumps(knock) + "\n")
    coordinator.tick()
    reply = poker.public.get(f"reply/z/{nonce}")
    assert reply is None or reply["ok"] is False
    assert poker.knock(coordinator)["ok"] is True


def test_unterminated_junk_does_not_swallow_the_next_knock(make_coordinator):
    coordinator = make_coordinator()
    cfg = fleet_cfg(coordinator=f"127.0.0.1:{coordinator.port}", island="a", connect_timeout_s=1.5)
    member = FleetMember(cfg, nn.Linear(2, 2), dict(FINGERPRINT))
    member._connect()
    errors: list[BaseException] = []

    def knock() -> None:
        try:
            member._knock(reconnect=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    junk = Island(coordinator, "x")
    # the junk and the knock land between two ticks (a client appending junk in a loop makes
    # that the common case)
    junk.post("garbage without a newline")
    thread = threading.Thread(target=knock, daemon=True)
    thread.start()
    while b"nonce" not in junk.public.view.get(wire.KNOCK):
        time.sleep(0.005)
    while thread.is_alive():
        coordinator.tick()
        time.sleep(0.01)
    assert errors == [] and member.role == "member"


def test_the_coordinator_resolves_auto_outer_lr_once_for_every_island(make_coordinator):
    """ "auto" in the recipe: the coordinator picks the rate from its fleet.expect and every
    admitted island is given that number, which its outer optimizer then uses."""
    coordinator = make_coordinator(expect=8)
    auto = {**FINGERPRINT, "outer_lr": "auto"}
    assert Island(coordinator, "a").knock(coordinator, fingerprint=auto)["outer_lr"] == 0.8
    cfg = fleet_cfg(coordinator=f"127.0.0.1:{coordinator.port}", island="b", outer_lr="auto")
    member = FleetMember(cfg, nn.Linear(2, 2), auto)
    assert member.outer.lr == 0.6  # its own guess: it does not know the fleet's size
    knock_in(coordinator, member)
    assert member.role == "member" and member.outer.lr == 0.8


@pytest.mark.parametrize("sent", [float("nan"), float("inf"), -1.0, 1e9, "0.7", True, None])
def test_a_member_refuses_an_outer_lr_that_is_no_rate(sent):
    member = FleetMember(fleet_cfg(island="a"), nn.Linear(2, 2), dict(FINGERPRINT))
    with pytest.raises(Refused, match="outer learning rate"):
        member._take_outer_lr(sent)
    assert member.outer.lr == 0.6


# --- rounds -----------------------------------------------------------------------------------


def test_two_ready_members_commit_and_log_the_round(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    for island in (a, b):
        assert island.knock(coordinator) == {
            "ok": True,
            "role": "member",
            "round": 1,
            "outer_lr": 0.7,
        }
    a.ready(1, tokens=100)
    b.ready(1, tokens=300)
    rec = drive(coordinator, [a, b], planned(coordinator, 1, 0))
    assert rec == {"attempt": 0, "members": ["a", "b"]}
    a.result(1, 0, digest="abc", tokens=100)
    drive(coordinator, [a, b], lambda: coordinator.round.phase == "exchange")
    coordinator.tick()
    assert record(coordinator, 1).get("decision") is None  # one result is not enough
    b.result(1, 0, digest="abc", tokens=300)
    done = drive(coordinator, [a, b], decided(coordinator, 1, 0))
    assert done["decision"] == "commit"
    assert done["members"] == ["a", "b"]
    assert done["heal"] == []
    assert done["data"] == {"a": {"pos": 1}, "b": {"pos": 1}}
    assert coordinator.last_committed == 1 and coordinator.round.number == 2
    [logged] = rounds_log(tmp_path)
    assert logged["round"] == 1 and logged["attempt"] == 0
    assert logged["members"] == ["a", "b"]
    assert logged["bytes_sent"] == {"a": 1001, "b": 1001}
    assert logged["tokens"] == {"a": 100, "b": 300}
    assert logged["exchange_s"] == 0.25
    assert logged["digest"] == "abc"
    # the next round goes on from there
    commit_round(coordinator, [a, b], 2, digest="def")
    assert [r["round"] for r in rounds_log(tmp_path)] == [1, 2]
    assert coordinator.keys.get("status")["last_committed"] == 2


def test_a_failed_exchange_aborts_and_the_round_is_retried(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    a.ready(1)
    b.ready(1)
    drive(coordinator, [a, b], planned(coordinator, 1, 0))
    a.result(1, 0, digest="d1")
    b.result(1, 0, ok=False)
    # the abort record is written, then (the same tick) the next attempt waits for planning
    aborted = drive(coordinator, [a, b], decided(coordinator, 1, 0))
    assert aborted["decision"] == "abort" and aborted["members"] == ["a", "b"]
    assert rounds_log(tmp_path) == []
    rec = drive(coordinator, [a, b], planned(coordinator, 1, 1))
    assert rec["members"] == ["a", "b"]
    a.result(1, 1, digest="d3")
    b.result(1, 1, digest="d3")
    assert drive(coordinator, [a, b], decided(coordinator, 1, 1))["decision"] == "commit"
    [logged] = rounds_log(tmp_path)
    assert logged["round"] == 1 and logged["attempt"] == 1 and logged["digest"] == "d3"


def test_a_silent_member_aborts_the_exchange_and_is_left_out(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    a, b, c = Island(coordinator, "a"), Island(coordinator, "b"), Island(coordinator, "c")
    for island in (a, b, c):
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, [a, b, c], planned(coordinator, 1, 0))
    a.result(1, 0)
    b.result(1, 0)
    # c stops beating mid-exchange: gone after heartbeat_timeout_s
    started = time.monotonic()
    aborted = drive(coordinator, [a, b], decided(coordinator, 1, 0))
    assert time.monotonic() - started >= HB_TIMEOUT * 0.5  # not before c went quiet
    assert aborted["decision"] == "abort"
    rec = drive(coordinator, [a, b], planned(coordinator, 1, 1))
    assert rec["members"] == ["a", "b"]
    a.result(1, 1)
    b.result(1, 1)
    done = drive(coordinator, [a, b], decided(coordinator, 1, 1))
    assert done["decision"] == "commit" and done["members"] == ["a", "b"]
    assert rounds_log(tmp_path)[0]["members"] == ["a", "b"]


def test_a_fresh_island_is_healed_by_a_member_never_becomes_the_donor(make_coordinator):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "b"), Island(coordinator, "c")  # donor candidates
    a.knock(coordinator)
    b.knock(coordinator)
    commit_round(coordinator, [a, b], 1)
    # "a" sorts first, so if joiners could be members it would be picked as the donor
    fresh = Island(coordinator, "a")
    reply = fresh.knock(coordinator)
    assert reply == {"ok": True, "role": "joiner", "round": 2, "outer_lr": 0.7}
    fresh.ready(2)  # even a joiner that says it is ready is not a member of round 2
    for island in (a, b):
        island.ready(2)
    rec = drive(coordinator, [a, b, fresh], planned(coordinator, 2, 0))
    assert rec["members"] == ["b", "c"]
    for island in (a, b):
        island.result(2, 0)
    done = drive(coordinator, [a, b, fresh], decided(coordinator, 2, 0))
    assert done["decision"] == "commit"
    [heal] = done["heal"]
    assert heal["island"] == "a" and heal["nonce"] == fresh.nonce
    assert heal["donor"] in done["members"] and heal["donor"] != "a"
    # healed, it is a member of round 3
    assert coordinator.islands["a"].role == "member"
    for island in (a, b, fresh):
        island.ready(3)
    rec = drive(coordinator, [a, b, fresh], planned(coordinator, 3, 0))
    assert rec["members"] == ["a", "b", "c"]


def test_the_round_a_restarted_island_holds_must_be_the_fleets_state_of_it(make_coordinator):
    """After a carried-on restore a round number can name two states: an island that comes
    back saying it holds the last committed round is a member only if its global parameters'
    digest is the one the fleet committed; otherwise it is a joiner, healed before its work
    counts."""
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    commit_round(coordinator, [a, b], 1, digest="d1")
    back = Island(coordinator, "c")
    other_lineage = back.knock(coordinator, round_have=1, digest="d-other")
    assert other_lineage["role"] == "joiner"
    same = Island(coordinator, "d").knock(coordinator, round_have=1, digest="d1")
    assert same["role"] == "member"


def test_coordinator_restart_loses_and_repeats_no_round(make_coordinator, tmp_path):
    first = make_coordinator()
    a, b, c = Island(first, "a"), Island(first, "b"), Island(first, "c")
    for island in (a, b, c):
        island.knock(first)
    commit_round(first, [a, b, c], 1)
    commit_round(first, [a, b, c], 2)
    # the coordinator restarts (here: on another port, with a fresh store); islands re-knock
    second = make_coordinator()
    for island in (a, b, c):
        island.connect(second)
    assert b.knock(second, round_have=2, reconnect=True) == {
        "ok": True,
        "role": "member",
        "round": 3,
        "outer_lr": 0.7,
    }
    # one that missed round 2 (it holds round 1) must be healed
    assert c.knock(second, round_have=1, reconnect=True)["role"] == "joiner"
    assert a.knock(second, round_have=2, reconnect=True)["role"] == "member"
    assert second.last_committed == 2 and second.round.number == 3
    assert record(second, 1) is None and record(second, 2) is None
    for island in (a, b, c):
        island.ready(3)
    rec = drive(second, [a, b, c], planned(second, 3, 0))
    assert rec["members"] == ["a", "b"]
    a.result(3, 0)
    b.result(3, 0)
    done = drive(second, [a, b, c], decided(second, 3, 0))
    assert done["decision"] == "commit"
    assert done["heal"] == [{"island": "c", "donor": "a", "nonce": c.nonce}]
    assert [r["round"] for r in rounds_log(tmp_path)] == [1, 2, 3]


def test_restart_learns_the_latest_round_whatever_the_knock_order(make_coordinator):
    first = make_coordinator()
    a, b = Island(first, "a"), Island(first, "b")
    a.knock(first)
    b.knock(first)
    commit_round(first, [a, b], 1)
    second = make_coordinator()
    a.connect(second)
    b.connect(second)
    # the island behind knocks first: the coordinator's own log says round 1 was committed
    assert b.knock(second, round_have=0, reconnect=True)["role"] == "joiner"
    assert a.knock(second, round_have=1, reconnect=True) == {
        "ok": True,
        "role": "member",
        "round": 2,
        "outer_lr": 0.7,
    }
    assert second.islands["b"].role == "joiner"
    a.ready(2)
    rec = drive(second, [a, b], planned(second, 2, 0))
    assert rec["members"] == ["a"]


def test_restart_never_tells_an_island_a_role_it_then_changes(make_coordinator):
    first = make_coordinator()
    a, b = Island(first, "a"), Island(first, "b")
    a.knock(first)
    b.knock(first)
    commit_round(first, [a, b], 1)  # b crashed before reading this commit: it holds round 0
    second = make_coordinator()
    a.connect(second)
    b.connect(second)
    b_nonce = b.send_knock(second, round_have=0, reconnect=True)
    second.tick()
    a.knock(second, round_have=1, reconnect=True)
    drive(second, [a, b], lambda: second._settled())
    told = b.reply(b_nonce)
    assert told is not None
    assert told["role"] == second.islands["b"].role


def test_restart_does_not_commit_a_round_twice(make_coordinator, tmp_path):
    first = make_coordinator()
    a, b = Island(first, "a"), Island(first, "b")
    a.knock(first)
    b.knock(first)
    commit_round(first, [a, b], 1)  # b crashed before reading this commit: it holds round 0
    second = make_coordinator()
    a.connect(second)
    b.connect(second)
    b.knock(second, round_have=0, reconnect=True)
    b.ready(1)
    # a is in its inner steps: its heartbeat thread beats on the new store, it knocks later
    deadline = time.monotonic() + 3 * HB_TIMEOUT + 0.5
    while time.monotonic() < deadline:
        a.beat()
        b.beat()
        second.tick()
        rec = record(second, 1)
        if rec and rec.get("decision") is None and "b" in rec["members"]:
            b.result(1, rec["attempt"], digest="stale")
        time.sleep(0.01)
    a.knock(second, round_have=1, reconnect=True)
    assert [r["round"] for r in rounds_log(tmp_path)] == [1]
    assert second.last_committed == 1


def test_grace_window_before_a_partial_round(make_coordinator):
    grace = 0.5
    coordinator = make_coordinator(grace_s=grace, min_islands=2)
    a, b, c = Island(coordinator, "a"), Island(coordinator, "b"), Island(coordinator, "c")
    for island in (a, b, c):
        island.knock(coordinator)
    # let the coordinator settle (it waits for re-knocks after a start) with nobody ready
    drive(coordinator, [a, b, c], lambda: coordinator._settled())
    a.ready(1)
    b.ready(1)
    started = time.monotonic()
    drive(coordinator, [a, b, c], lambda: time.monotonic() - started > grace * 0.8)
    assert record(coordinator, 1) is None  # no round before the grace window ends
    rec = drive(coordinator, [a, b, c], planned(coordinator, 1, 0))
    assert time.monotonic() - started >= grace
    assert rec["members"] == ["a", "b"]


def test_grace_window_needs_min_islands(make_coordinator):
    coordinator = make_coordinator(grace_s=0.1, min_islands=2)
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    drive(coordinator, [a, b], lambda: coordinator._settled())
    a.ready(1)
    started = time.monotonic()
    drive(coordinator, [a, b], lambda: time.monotonic() - started > 0.4)
    assert record(coordinator, 1) is None  # one ready, two required: wait for b
    b.ready(1)
    assert drive(coordinator, [a, b], planned(coordinator, 1, 0))["members"] == ["a", "b"]


# --- guards -----------------------------------------------------------------------------------


def test_the_odd_digest_is_quarantined_and_healed_the_round_commits(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    islands = [Island(coordinator, n) for n in "abc"]
    for island in islands:
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, islands, planned(coordinator, 1, 0))
    islands[0].result(1, 0, digest="good")
    islands[1].result(1, 0, digest="good")
    islands[2].result(1, 0, digest="flipped", excluded=["c"])
    done = drive(coordinator, islands, decided(coordinator, 1, 0))
    assert done["decision"] == "commit" and done["members"] == ["a", "b"]
    assert [(h["island"], h["donor"]) for h in done["heal"]] == [("c", "a")]
    [logged] = rounds_log(tmp_path)
    assert logged["digest"] == "good" and logged["quarantined"] == ["c"]
    assert logged["excluded"] == ["c"]
    fired = {(g["guard"], g["island"]) for g in read_guard_log(tmp_path)}
    assert fired == {("digest", "c"), ("pseudo_gradient", "c")}
    # c is healed, then takes part in round 2 again
    assert coordinator.islands["c"].role == "member"


def test_with_two_islands_the_one_whose_work_was_left_out_is_quarantined(make_coordinator):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    for island in (a, b):
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, [a, b], planned(coordinator, 1, 0))
    # a sorts first, so a tie would go to a: the outlier guard's suspect decides instead
    a.result(1, 0, digest="flipped", excluded=["a"])
    b.result(1, 0, digest="good", excluded=["a"])
    done = drive(coordinator, [a, b], decided(coordinator, 1, 0))
    assert done["members"] == ["b"] and [h["island"] for h in done["heal"]] == ["a"]


def test_a_silent_island_and_a_slow_link_are_reported(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    a, b, c = (Island(coordinator, n) for n in "abc")
    for island in (a, b, c):
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, [a, b, c], planned(coordinator, 1, 0))
    a.result(1, 0, exchange_s=0.2)
    b.result(1, 0, exchange_s=0.25)
    c.result(1, 0, exchange_s=3.0)
    drive(coordinator, [a, b, c], decided(coordinator, 1, 0))
    drive(
        coordinator,
        [a, b],
        lambda: any(g["guard"] == "heartbeat" for g in read_guard_log(tmp_path)),
    )
    fired = [(g["guard"], g["island"]) for g in read_guard_log(tmp_path)]
    assert fired == [("link", "c"), ("heartbeat", "c")]


def test_a_straggler_is_reported_once(make_coordinator, tmp_path):
    coordinator = make_coordinator()
    islands = [Island(coordinator, n) for n in "abc"]
    for island in islands:
        island.knock(coordinator)
    speeds = {"a": 1000.0, "b": 1100.0, "c": 300.0}
    for _ in range(8):
        for island in islands:
            island.keys.put(
                f"hb/{island.name}",
                {"state": "training", "n": island.beats, "tokens_per_s": speeds[island.name]},
            )
            island.beats += 1
        coordinator.tick()
    [fired] = read_guard_log(tmp_path)
    assert fired["guard"] == "straggler" and fired["island"] == "c"
    assert fired["factor"] == pytest.approx(3.5, rel=0.01)


def test_with_the_digest_guard_off_a_disagreement_goes_unnoticed(make_coordinator, tmp_path):
    coordinator = make_coordinator(guards=GuardsConfig(fleet_digest=False))
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    for island in (a, b):
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, [a, b], planned(coordinator, 1, 0))
    a.result(1, 0, digest="good")
    b.result(1, 0, digest="flipped")
    done = drive(coordinator, [a, b], decided(coordinator, 1, 0))
    assert done["decision"] == "commit" and done["members"] == ["a", "b"]
    assert read_guard_log(tmp_path) == []


def test_a_ready_mark_left_by_a_dead_process_does_not_count(make_coordinator):
    """A killed island's ready key outlives it; its restart (a new nonce) must not inherit it."""
    coordinator = make_coordinator(grace_s=10.0)
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    a.knock(coordinator)
    b.knock(coordinator)
    b.ready(1)  # then b dies and restarts before round 1 is planned
    drive(coordinator, [a], lambda: not coordinator._is_alive(coordinator.islands["b"]))
    assert b.knock(coordinator)["ok"]
    a.ready(1)
    drive(coordinator, [a, b], lambda: True, timeout=0.3)
    assert record(coordinator, 1) is None, "round 1 was planned with the dead process's mark"
    b.ready(1)
    rec = drive(coordinator, [a, b], planned(coordinator, 1, 0))
    assert rec["members"] == ["a", "b"]


@pytest.mark.parametrize("names", ["ab", "abc"])
def test_a_disagreement_that_outlasts_a_retry_commits_and_heals_the_odd_island(
    make_coordinator, tmp_path, names
):
    """With min_islands = every island a quarantine leaves too few to commit. The round is
    retried once (a disagreement that arose in transit passes); when the same island disagrees
    again (its held state is wrong, and an abort does not repair it) the round commits with the
    fleet's digest and heals it, where before it was retried for ever."""
    coordinator = make_coordinator(min_islands=len(names))
    islands = [Island(coordinator, n) for n in names]
    odd = islands[-1]
    for island in islands:
        island.knock(coordinator)
        island.ready(1)
    for attempt, decision in [(0, "abort"), (1, "commit")]:
        drive(coordinator, islands, planned(coordinator, 1, attempt))
        for island in islands:  # the outlier guard names the odd one: it loses a 1-1 tie
            digest = "flipped" if island is odd else "good"
            island.result(1, attempt, digest=digest, excluded=[odd.name])
        done = drive(coordinator, islands, decided(coordinator, 1, attempt))
        assert done["decision"] == decision, done
    assert done["members"] == list(names[:-1])
    assert [h["island"] for h in done["heal"]] == [odd.name]
    [logged] = rounds_log(tmp_path)
    assert logged["round"] == 1 and logged["attempt"] == 1 and logged["quarantined"] == [odd.name]


def test_a_quarantined_island_is_healed_once_and_then_takes_part_again(make_coordinator):
    coordinator = make_coordinator()
    a, b = Island(coordinator, "a"), Island(coordinator, "b")
    for island in (a, b):
        island.knock(coordinator)
        island.ready(1)
    drive(coordinator, [a, b], planned(coordinator, 1, 0))
    a.result(1, 0, digest="flipped", excluded=["a"])
    b.result(1, 0, digest="good", excluded=["a"])
    done = drive(coordinator, [a, b], decided(coordinator, 1, 0))
    assert done["members"] == ["b"] and [h["island"] for h in done["heal"]] == ["a"]
    # a's mark for round 1 is still there, but a was healed at round 1: it is not late
    a.ready(2)
    b.ready(2)
    rec = drive(coordinator, [a, b], planned(coordinator, 2, 0))
    assert rec["members"] == ["a", "b"]


def test_with_no_member_alive_a_joiner_restores_and_carries_the_fleet_on(make_coordinator):
    """Every member of the last round died: nobody can heal the joiners. One is told to restore
    the fleet's durable state; the coordinator makes it the member the others heal from."""
    coordinator = make_coordinator()
    a = Island(coordinator, "a")
    a.knock(coordinator)
    commit_round(coordinator, [a], 1)
    b, c = Island(coordinator, "b"), Island(coordinator, "c")
    assert b.knock(coordinator)["role"] == "joiner"
    assert c.knock(coordinator)["role"] == "joiner"
    time.sleep(HB_TIMEOUT + 0.1)  # a is gone
    asked = drive(coordinator, [b, c], lambda: b.keys.get(f"restore/b/{b.nonce}"))
    assert asked == {"round": 1}
    assert c.keys.get(f"restore/c/{c.nonce}") == {"round": 1}
    b.keys.put(f"restored/b/{b.nonce}", {"from_round": 1})  # the fleet checkpoint of round 1
    order = drive(coordinator, [b, c], lambda: b.keys.get(f"heal/b/{b.nonce}"))
    assert order == {"round": 1, "donor": "b", "final": False}
    assert coordinator.islands["b"].role == "member"
    assert coordinator.islands["c"].role == "joiner"
    b.ready(2)
    rec = drive(coordinator, [b, c], planned(coordinator, 2, 0))
    assert rec["members"] == ["b"]
    b.result(2, 0)
    done = drive(coordinator, [b, c], decided(coordinator, 2, 0))
    assert done["decision"] == "commit"
    assert [h["island"] for h in done["heal"]] == ["c"] and done["heal"][0]["donor"] == "b"


# --- cost of a tick ---------------------------------------------------------------------------


def test_watch_moves_with_its_counter_and_looks_again_after_a_while(make_coordinator):
    coordinator = make_coordinator()
    keys = Island(coordinator, "a").keys
    watch = wire.Watch(keys, wire.ORDERS, every_s=0.2)
    assert watch.moved()  # the first look always reads: a wait reads what was written before it
    assert not watch.moved()
    keys.bump(wire.ORDERS)
    assert watch.moved() and not watch.moved()
    time.sleep(0.25)
    assert watch.moved()  # a counter a restarted coordinator began again delays nothing for long


def test_the_coordinator_bumps_orders_after_a_tick_that_wrote(make_coordinator):
    coordinator = make_coordinator()
    a = Island(coordinator, "a")
    before = a.keys.counter(wire.ORDERS)
    a.knock(coordinator)  # the coordinator writes a challenge, then a reply
    after = a.keys.counter(wire.ORDERS)
    assert after > before


def test_the_exchange_deadline_allows_for_the_payload_on_the_slowest_link(make_coordinator):
    """Each member receives every other's message: the deadline adds their bytes at the floor
    rate (here 1 kB/s), or at half the slowest rate a member measured; a nonsense report adds
    nothing (fleet/deadlines.py)."""
    coordinator = make_coordinator(link_floor_mbit_s=0.008)  # 1,000 bytes per second
    a, b, c = Island(coordinator, "a"), Island(coordinator, "b"), Island(coordinator, "c")
    for island in (a, b, c):
        island.knock(coordinator)
    a.ready(1, bytes=3000, rate=0)
    b.ready(1, bytes=1000, rate=float("inf"))
    c.ready(1, bytes=-1, rate=4000)  # c's link measured 4 kB/s: faster than the floor
    drive(coordinator, [a, b, c], planned(coordinator, 1, 0))
    base = coordinator.cfg.timeout_s + 5.0  # the collective's timeout and the margin
    assert coordinator.round.overdue_s == pytest.approx(base + 2 * 3000 / 1000)
    for island in (a, b, c):
        island.result(1, 0)
    drive(coordinator, [a, b, c], decided(coordinator, 1, 0))
    for island, rate in ((a, 500), (b, 0), (c, 1e40)):  # a measured 500 B/s: slower
        island.ready(2, bytes=3000, rate=rate)
    drive(coordinator, [a, b, c], planned(coordinator, 2, 0))
    assert coordinator.round.overdue_s == pytest.approx(base + 2 * 3000 / 250)
