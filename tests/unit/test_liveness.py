"""Liveness from the transport: the coordinator learns a death from its island's connection
ending, not from a heartbeat timeout; a hang that keeps the connection open is still caught by
the timeout; a hello that is forged or replayed attaches nothing.

Closing the island's socket here does what the kernel does for a process that dies (its
sockets are closed, the peer reads end-of-file); tests/dist/test_fleet.py kills real processes.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from ostinato.fleet import wire
from ostinato.fleet.coordinator import Coordinator
from ostinato.fleet.guards import read_guard_log
from ostinato.fleet.liveness import KEY, LivenessLink, hello_mac
from tests.unit.test_coordinator import (
    TOKEN,
    Island,
    decided,
    drive,
    fleet_cfg,
    planned,
    record,
)

pytestmark = pytest.mark.timeout(60)

LONG_TIMEOUT = 30.0  # a heartbeat timeout no test waits for: only the transport can be quick


@pytest.fixture
def coordinator(tmp_path):
    made = Coordinator("127.0.0.1:0", fleet_cfg(heartbeat_timeout_s=LONG_TIMEOUT), tmp_path)
    made.slow_tick_s = 0.0
    made.started -= LONG_TIMEOUT  # no settling wait for islands after the start
    yield made
    made.close()


def linked(coordinator: Coordinator, *names: str) -> dict[str, tuple[Island, LivenessLink]]:
    """Islands admitted, each with its liveness connection attached."""
    islands = {}
    for name in names:
        island = Island(coordinator, name)
        assert island.knock(coordinator)["ok"]
        link = LivenessLink(f"127.0.0.1:{coordinator.port}", TOKEN, name)
        # keep() waits for the challenge, which the coordinator sends when it ticks
        keeping = threading.Thread(target=link.keep, args=(island.keys, island.nonce))
        keeping.start()
        while keeping.is_alive():
            coordinator.tick()
            keeping.join(0.01)
        islands[name] = (island, link)
    drive(
        coordinator,
        [],
        lambda: all(coordinator.liveness.connected(n, i.nonce) for n, (i, _) in islands.items()),
    )
    return islands


def test_a_closed_connection_aborts_the_exchange_without_waiting_for_the_timeout(
    coordinator, tmp_path
):
    islands = linked(coordinator, "a", "b", "c")
    (a, _), (b, _), (c, c_link) = islands["a"], islands["b"], islands["c"]
    for island in (a, b, c):
        island.ready(1)
    drive(coordinator, [a, b, c], planned(coordinator, 1, 0))
    a.result(1, 0)
    b.result(1, 0)
    died = time.monotonic()
    c_link.sock.close()  # c dies mid-exchange
    aborted = drive(coordinator, [a, b, c], decided(coordinator, 1, 0))  # c's beats linger
    # The bound: a few coordinator ticks and a loopback FIN, far below the heartbeat timeout
    # (30 s); 2 s leaves room for a loaded machine.
    assert time.monotonic() - died < 2.0
    assert aborted["decision"] == "abort"
    retry = drive(coordinator, [a, b], planned(coordinator, 1, 1))
    assert retry["members"] == ["a", "b"]
    [event] = [e for e in read_guard_log(tmp_path) if e["island"] == "c"]
    assert event["guard"] == "heartbeat" and event["transport"] is True
    assert "connection closed" in event["message"]
    # c's restart is admitted at once: its predecessor counts as gone, no timeout to wait out
    restarted = Island(coordinator, "c")
    assert restarted.knock(coordinator)["ok"] is True


def test_a_bye_is_a_departure_not_a_death(coordinator, tmp_path):
    islands = linked(coordinator, "a", "b")
    islands["b"][1].leave()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        coordinator.tick()
        time.sleep(0.01)
    assert not coordinator.liveness.connected("b", islands["b"][0].nonce)
    assert read_guard_log(tmp_path) == []


def test_a_hang_keeps_its_connection_and_is_caught_by_the_heartbeat_timeout(tmp_path):
    timeout = 0.5
    coordinator = Coordinator("127.0.0.1:0", fleet_cfg(heartbeat_timeout_s=timeout), tmp_path)
    coordinator.slow_tick_s = 0.0
    try:
        islands = linked(coordinator, "a", "b")
        (a, _), (b, b_link) = islands["a"], islands["b"]
        a.ready(1)
        b.ready(1)
        drive(coordinator, [a, b], planned(coordinator, 1, 0))
        a.result(1, 0)
        stopped = time.monotonic()  # b hangs: no beats, its connection stays open
        aborted = drive(coordinator, [a], decided(coordinator, 1, 0))
        assert time.monotonic() - stopped >= timeout * 0.5  # not before b went quiet
        assert aborted["decision"] == "abort"
        assert coordinator.liveness.connected("b", b.nonce) and b_link.sock is not None
        [event] = read_guard_log(tmp_path)
        assert event["guard"] == "heartbeat" and "transport" not in event
    finally:
        coordinator.close()


def hello_line(coordinator: Coordinator, hello: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", coordinator.liveness.port), timeout=2)
    coordinator.tick()  # accepts, and sends the challenge
    sock.recv(64)
    sock.sendall((json.dumps(hello) + "\n").encode())
    return sock


def hung_up(sock: socket.socket) -> bool:
    """Whether the other end closed (end-of-file, or a reset when our bytes were left unread)."""
    sock.settimeout(2)
    try:
        while sock.recv(64):  # a challenge not read yet comes first
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_forged_replayed_or_oversized_hello_attaches_nothing(coordinator):
    [(island, link)] = linked(coordinator, "a").values()
    assert coordinator.keys.get(KEY) == {"port": coordinator.liveness.port}
    # a hello under another token
    sock = socket.create_connection(("127.0.0.1", coordinator.liveness.port), timeout=2)
    coordinator.tick()
    challenge = sock.recv(64).decode().strip()
    forged = {"island": "x", "nonce": "n", "mac": hello_mac("not-the-token", "x", "n", challenge)}
    sock.sendall((json.dumps(forged) + "\n").encode())
    # a right hello, replayed on a new connection (whose challenge differs)
    replayed = {
        "island": "a",
        "nonce": island.nonce,
        "mac": hello_mac(TOKEN, "a", island.nonce, challenge),
    }
    again = hello_line(coordinator, replayed)
    junk = socket.create_connection(("127.0.0.1", coordinator.liveness.port), timeout=2)
    junk.sendall(b"x" * 5000)  # no newline, more than any hello
    for _ in range(20):
        coordinator.tick()
        time.sleep(0.01)
    assert [a.island for a in coordinator.liveness.attached.values()] == ["a"]
    assert all(hung_up(refused) for refused in (sock, again, junk))
    # closing the refused connections reports nobody
    for refused in (sock, again, junk):
        refused.close()
    for _ in range(10):
        coordinator.tick()
        time.sleep(0.01)
    assert not coordinator.islands["a"].closed and link.sock is not None


class CountingKeys(wire.Keys):
    """A coordinator's keys that count its reads (each is one or two store round trips)."""

    def __init__(self, keys: wire.Keys):
        super().__init__(keys.store, "")
        self.view, self.writes, self.reads = keys.view, keys.writes, 0

    def get(self, key: str, default=None):
        self.reads += 1
        return super().get(key, default)


def test_between_slow_ticks_only_news_makes_the_coordinator_read_the_round(coordinator):
    """The coordinator sleeps on the liveness connections between slow ticks: it reads no store
    key while the islands train, and a ready mark is seen once the island sends its news."""
    islands = linked(coordinator, "a", "b")
    counting = CountingKeys(coordinator.keys)
    coordinator.keys = coordinator.membership.keys = counting
    coordinator.slow_tick_s, coordinator.last_slow_tick = 3600.0, time.monotonic()
    coordinator.tick()  # the round as it stands, once
    counting.reads = 0
    for _ in range(5):
        coordinator.tick()
    assert counting.reads == 0
    for island, _ in islands.values():  # written, no news yet: unseen
        island.ready(1)
    coordinator.tick()
    assert counting.reads == 0 and record(coordinator, 1) is None
    started = time.monotonic()
    islands["a"][1].news()
    coordinator._wait(time.monotonic())  # woken by the news, not by the hour-long slow tick
    assert time.monotonic() - started < 5.0
    coordinator.tick()
    assert record(coordinator, 1) == {"attempt": 0, "members": ["a", "b"]}
