"""The fleet listens only where told, and trusts no payload whose MAC fails: a real coordinator
store, real gloo groups and real members (threads of this process) on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

from ostinato.fleet import wire
from ostinato.fleet.coordinator import Coordinator
from ostinato.fleet.guards import read_guard_log
from ostinato.fleet.member import FleetMember
from ostinato.jsonl import read_jsonl
from tests.unit.test_coordinator import FINGERPRINT, fleet_cfg

pytestmark = pytest.mark.timeout(120)


def listening() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket this process listens on, from /proc: the sockets
    the kernel holds, whatever the library that opened them says."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            address, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in mine:  # 0A: LISTEN
                continue
            host, port = address.split(":")
            raw = bytes.fromhex(host)
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            family = socket.AF_INET if width == 4 else socket.AF_INET6
            found.add((socket.inet_ntop(family, words), int(port, 16)))
    return found


def connects(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5.0)
        code = probe.connect_ex((host, port))
    assert code in (0, errno.ECONNREFUSED), os.strerror(code)
    return code == 0


def test_the_coordinator_listens_on_the_bound_address_only(tmp_path):
    coordinator = Coordinator("127.0.0.1:0", fleet_cfg(), tmp_path)
    port = coordinator.port
    assert {a for a, p in listening() if p == port} == {"127.0.0.1"}
    assert connects("127.0.0.1", port)
    assert not connects("127.0.0.2", port)  # another local address: refused
    # and the store serves its clients on the bound address
    client = wire.Keys(wire.connect(f"127.0.0.1:{port}", 5.0), "x")
    client.put("k", {"v": 1})
    assert coordinator.store.get("x/k") == b'{"v": 1}'


def test_exchange_groups_listen_on_the_address_towards_the_coordinator(tmp_path):
    coordinator = Coordinator("127.0.0.1:0", fleet_cfg(), tmp_path)
    address = f"127.0.0.1:{coordinator.port}"
    before = listening()
    device = wire.gloo_device(address)
    groups: dict[int, Any] = {}

    def join(rank: int) -> None:
        store = wire.connect(address, 5.0)
        prefixed = torch.distributed.PrefixStore("test/pg", store)
        groups[rank] = wire.gloo_group(prefixed, rank, 2, 10.0, device)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    outputs = [[torch.zeros(3) for _ in range(2)] for _ in range(2)]
    works = [groups[r].allgather([outputs[r]], [torch.full((3,), float(r))]) for r in range(2)]
    for work in works:
        work.wait()
    assert torch.equal(outputs[0][1], torch.ones(3))
    opened = listening() - before
    assert opened, "the group opened no listening socket"
    assert {a for a, _ in opened} == {wire.local_address(address)} == {"127.0.0.1"}
    # gloo's rendezvous keys are where the coordinator deletes them from (wire.group_keys)
    keys = wire.group_keys("test/pg", 2)
    assert coordinator.store.check(keys)
    for key in keys:
        coordinator.store.delete_key(key)
    assert not any(coordinator.store.check([key]) for key in keys)


# --- payloads changed in transit --------------------------------------------------------------


def linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(8, 8)


class Ticking:
    """A coordinator ticking in a thread, as `ostinato fleet coordinator` runs it."""

    def __init__(self, tmp_path, **overrides: Any):
        self.coordinator = Coordinator("127.0.0.1:0", fleet_cfg(**overrides), tmp_path)
        self.coordinator.slow_tick_s = 0.02
        self.address = f"127.0.0.1:{self.coordinator.port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.coordinator.tick()
            time.sleep(0.005)

    def member(self, name: str, model: nn.Module) -> FleetMember:
        cfg = fleet_cfg(coordinator=self.address, island=name, heartbeat_s=0.05)
        return FleetMember(cfg, model, dict(FINGERPRINT))


def flip_one_byte(raw: torch.Tensor) -> None:
    raw[raw.numel() // 2] ^= 1


def test_a_pseudo_gradient_changed_in_transit_is_refused_and_its_sender_counted(tmp_path):
    fleet = Ticking(tmp_path, heartbeat_timeout_s=2.0, timeout_s=20.0, grace_s=5.0)
    models = {"a": linear(1), "b": linear(2)}
    members = {name: fleet.member(name, model) for name, model in models.items()}
    for name, member in members.items():
        member.start(models[name])
    gather = members["a"]._all_gather

    def tampered(mine, number, attempt, names, shard):
        gathered = gather(mine, number, attempt, names, shard)
        flip_one_byte(gathered[names.index("b")])  # b's payload, as it reached a
        return gathered

    members["a"]._all_gather = tampered
    outcomes: dict[str, Any] = {}
    for name, model in models.items():  # each island trained: its parameters moved
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 if name == "a" else -0.02)

    def sync(name: str) -> None:
        outcomes[name] = members[name].sync(models[name], tokens=100, data={})

    threads = [threading.Thread(target=sync, args=(n,), daemon=True) for n in members]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert set(outcomes) == {"a", "b"}, "a member did not finish the round"
    finally:
        fleet.stop.set()
        for member in members.values():
            member.close()
    [logged] = read_jsonl(tmp_path / "rounds.jsonl")
    assert logged["refused"] == ["b"] and logged["members"] == ["a"]
    macs = [g for g in read_guard_log(tmp_path) if g["guard"] == "mac"]
    assert [(g["island"], g["receivers"]) for g in macs] == [("b", ["a"])]
    # b's own average held its payload, so its digest was the odd one: healed from a
    assert outcomes["a"].committed and not outcomes["b"].committed
    assert torch.equal(members["a"].outer.global_params, members["b"].outer.global_params)
    assert members["b"].round_have == members["a"].round_have == 1


def test_a_heal_changed_in_transit_is_refused_and_taken_from_another_donor():
    store = wire.serve_store("127.0.0.1:0")
    address = f"127.0.0.1:{store.port}"

    def member(name: str, seed: int) -> FleetMember:
        joined = FleetMember(fleet_cfg(coordinator=address, island=name), linear(seed), {})
        joined._connect()
        joined.nonce = f"nonce-{name}"
        return joined

    a, b, joiner = member("a", 1), member("b", 2), member("j", 3)
    joiner.role = "joiner"
    receive = joiner._receive_shard

    def tampered(name: str, nbytes: int) -> torch.Tensor:
        sealed = receive(name, nbytes)
        if name.startswith("healpg/1/"):  # a's heal (of round 1)
            flip_one_byte(sealed)
        return sealed

    joiner._receive_shard = tampered
    healed: list[bool] = []
    thread = threading.Thread(target=lambda: healed.append(joiner._heal()), daemon=True)
    thread.start()
    heal = {"island": "j", "nonce": joiner.nonce}
    a._serve_heal(heal, 1, final=False)
    report = joiner._wait_for(lambda: joiner.keys.get("healbad/j/nonce-j"), "report", 30.0)
    assert report == {"round": 1, "donor": "a"}
    assert joiner.round_have == 0 and joiner.role == "joiner"  # nothing of a's state taken
    assert not torch.equal(joiner.outer.global_params, a.outer.global_params)
    b._serve_heal(heal, 2, final=False)  # the coordinator's next order: another donor
    thread.join(60)
    assert healed == [False]  # healed, and round 2 is not the fleet's last
    assert joiner.round_have == 2 and joiner.role == "member"
    assert torch.equal(joiner.outer.global_params, b.outer.global_params)
