"""Healing a restarted island mid-round (fleet/prompt_heal.py), on the coordinator alone: the
tests play the donor by writing the heal order it writes as it starts sending."""

from __future__ import annotations

import pytest

from tests.unit.test_coordinator import Island, commit_round, decided, drive, planned

pytestmark = pytest.mark.timeout(60)


def after_round_one(coordinator) -> tuple[Island, Island]:
    """Members b and c, who have committed round 1."""
    members = Island(coordinator, "b"), Island(coordinator, "c")
    for island in members:
        island.knock(coordinator)
    commit_round(coordinator, list(members), 1)
    return members


@pytest.fixture
def fleet(make_coordinator):
    """Members b and c have committed round 1; joiner a (round 0) knocks while they train."""
    coordinator = make_coordinator()
    b, c = after_round_one(coordinator)
    a = Island(coordinator, "a")
    assert a.knock(coordinator)["role"] == "joiner"
    return coordinator, a, b, c


def serve(donor: Island, joiner: Island, number: int) -> None:
    """What the donor writes as it starts sending the heal (joining.serve_asked_heal)."""
    order = {"round": number, "donor": donor.name, "final": False, "now": True}
    donor.keys.put(f"heal/{joiner.name}/{joiner.nonce}", order)


def test_a_joiner_is_healed_at_once_and_ends_its_first_round_with_the_others(fleet):
    coordinator, a, b, c = fleet
    asked = coordinator.keys.get("healnow/b")  # b: the first member still training
    assert asked == {"island": "a", "nonce": a.nonce, "round": 1}
    serve(b, a, 1)
    drive(coordinator, [a, b, c], lambda: coordinator.islands["a"].role == "member")
    view = coordinator.islands["a"]
    assert view.fresh and view.have == 1
    assert not coordinator.keys.has("healnow/b")  # the request is done with
    # b and c are ready for round 2; a, healed mid-round, is told to end its round now
    b.ready(2)
    c.ready(2)
    hurry = drive(coordinator, [a, b, c], lambda: coordinator.keys.get("hurry/2"))
    assert hurry == {"islands": ["a"]}
    assert coordinator.keys.get("round/2") is None  # they wait for it (not the grace window)
    a.ready(2)
    rec = drive(coordinator, [a, b, c], planned(coordinator, 2, 0))
    assert rec["members"] == ["a", "b", "c"]
    for island in (a, b, c):
        island.result(2, 0)
    done = drive(coordinator, [a, b, c], decided(coordinator, 2, 0))
    assert done["decision"] == "commit" and done["heal"] == []  # healed already
    assert not coordinator.islands["a"].fresh and not coordinator.keys.has("hurry/2")


def test_a_donor_that_dies_before_sending_leaves_the_heal_to_the_next_commit(fleet):
    coordinator, a, b, c = fleet
    assert coordinator.keys.get("healnow/b")["island"] == "a"
    coordinator.islands["b"].closed = True  # b dies (its connection closed) before its step
    drive(coordinator, [a, c], lambda: not coordinator.keys.has("healnow/b"))
    assert coordinator.islands["a"].role == "joiner" and not coordinator.islands["a"].fresh
    c.ready(2)
    drive(coordinator, [a, c], planned(coordinator, 2, 0))
    c.result(2, 0)
    done = drive(coordinator, [a, c], decided(coordinator, 2, 0))
    assert [h["island"] for h in done["heal"]] == ["a"] and done["heal"][0]["donor"] == "c"


def test_no_heal_is_asked_of_a_member_that_is_ready_or_fresh(make_coordinator):
    coordinator = make_coordinator()
    b, _ = after_round_one(coordinator)
    b.ready(2)  # b has ended its round: it reaches no inner step before the commit
    a = Island(coordinator, "a")
    a.knock(coordinator)
    assert coordinator.keys.get("healnow/b") is None
    assert coordinator.keys.get("healnow/c")["island"] == "a"
