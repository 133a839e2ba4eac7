"""What each rank of an island does to its own fleet shards in a step of the fleet protocol
(fleet/shards.py, fleet/crew.py): the leader's FleetMember runs these on every rank through its
crew; with one rank, here.

A round's exchange is two operations. `open`: each rank compresses the pseudo-gradient of each
shard it owns, seals it (MAC over the round, attempt, shard and sender), all-gathers it with the
owners of that shard on the other members (a gloo group per shard: an island of N ranks
exchanges on N connections at once), unseals and unpacks what came, and reports the payloads
whose MAC failed and each sender's squared norm. The leader adds the squares over shards into
whole-model norms for the outlier guard, so the guard sees what it saw before the state was cut.
`step`: each rank averages the payloads of the members kept and takes its shards' tentative
outer step, and reports their digests. Ranks walk their shards in ascending order, so the groups
of an exchange or a heal never wait on each other in a cycle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ostinato.fleet import wire
from ostinato.fleet.compress import from_bytes, pack, unpack
from ostinato.fleet.shards import ShardSet, clip

log = logging.getLogger("ostinato")
Peers = dict[str, tuple[float, torch.Tensor]]  # sender -> (tokens, pseudo-gradient)


def heal_shard_group(name: str, shard: int, shards: int) -> str:
    """A heal's gloo group for one shard (the whole heal's name for an uncut state)."""
    return name if shards == 1 else f"{name}/s{shard}"


def exchange_group(number: int, attempt: int, shard: int, shards: int) -> str:
    """An exchange's gloo group for one shard: `pg/ROUND/ATTEMPT[/sK]`."""
    base = f"pg/{number}/{attempt}"
    return base if shards == 1 else f"{base}/s{shard}"


def open_payloads(
    gathered: list[torch.Tensor],
    members: list[str],
    numel: int,
    kind: str,
    block: int,
    opener: Callable[[torch.Tensor, str], torch.Tensor | None],
) -> tuple[Peers, list[str], dict[str, float]]:
    """Each member's payload of one shard (`opener`: the payload if its MAC holds, else None)
    as (tokens, pseudo-gradient); the members refused; each kept one's squared norm."""
    peers: Peers = {}
    refused, squares = [], {}
    for raw, sender in zip(gathered, members, strict=True):
        payload = opener(raw, sender)
        if payload is None:
            refused.append(sender)
            continue
        weight = float(payload[-8:].clone().view(torch.float64))
        peer = unpack(from_bytes(payload[:-8], numel, kind, block), block)
        peers[sender] = (weight, peer)
        squares[sender] = float(peer.double().square().sum())
    return peers, refused, squares


def average(peers: Peers, use: list[str], numel: int) -> torch.Tensor:
    """Token-weighted mean of the pseudo-gradients of `use`, summed in that (member) order so
    every member gets the same bits."""
    total = sum(peers[m][0] for m in use if m in peers) or 1.0
    averaged = torch.zeros(numel)
    for member in use:
        if member in peers:
            weight, peer = peers[member]
            averaged += (weight / total) * peer
    return averaged


class ShardOps:
    """Mixed into FleetMember (which sets these up): the per-rank operations of its crew."""

    shards: ShardSet
    crew: Any
    opened: dict[int, Peers]
    restore_state: Any
    round_have: int

    def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.keys is None and self.crew.rank > 0:  # a follower: its own, for its groups
            self._connect()
        return getattr(self, f"_op_{op}")(**args) or {}

    def _fragment_start(self, shard: int, fragment: int | None) -> int:
        return clip([self.shards.span(fragment)], *self.shards.bounds[shard])[0][0]

    def _op_open(self, number: int, attempt: int, members: list[str], tokens: int):
        fragment, kind = self.fragment(number), self.compression(number)
        refused: set[str] = set()
        squares: dict[str, float] = {}
        sent, self.opened = 0, {}
        count = torch.tensor([float(tokens)], dtype=torch.float64).view(torch.uint8)
        for k in self.shards.mine:
            numel = self.shards.fragment_size(k, fragment)
            if numel == 0:
                continue
            pseudo_gradient = self.shards.prepared[k]
            if self.warm(number):  # exact, so no quantization error to feed back
                packed = pack(pseudo_gradient, "fp32", self.cfg.block)
            else:
                start = self._fragment_start(k, fragment)
                packed = self.shards.feedback[k].compress(pseudo_gradient, start)
            context = ("pseudo-gradient", number, attempt, k)
            mine = torch.cat([packed.to_bytes(), count])
            mine = wire.seal(mine, self.token, *context, self.island)
            gathered = self._all_gather_unless_aborted(mine, number, attempt, members, k)
            sent += mine.numel() * (len(members) - 1)

            def opener(raw: torch.Tensor, sender: str, context=context) -> torch.Tensor | None:
                return wire.unseal(raw, self.token, *context, sender)

            peers, bad, sums = open_payloads(gathered, members, numel, kind, self.cfg.block, opener)
            self.opened[k] = peers
            refused.update(bad)
            for sender, square in sums.items():
                squares[sender] = squares.get(sender, 0.0) + square
        return {"refused": sorted(refused), "squares": squares, "bytes_sent": sent}

    def _op_step(self, number: int, use: list[str]):
        """The tentative outer step on each opened shard with the payloads of `use` (member
        order: every member sums in the same order and gets the same bits); a warm-start
        round's step is the plain average."""
        fragment = self.fragment(number)
        for k, peers in self.opened.items():
            averaged = average(peers, use, self.shards.fragment_size(k, fragment))
            if self.warm(number):
                self.shards.outer[k].tentative_average(averaged)
            else:
                self.shards.outer[k].tentative_step(averaged, fragment)
        self.opened = {}
        return self._op_digests()

    def _op_digests(self):
        return {"digests": {str(k): d for k, d in self.shards.digests().items()}}

    def _op_commit(self, keep_error: bool):
        self.shards.commit(keep_error)

    def _op_abort(self):
        self.opened = {}
        self.shards.abort()

    def _op_reset(self):
        self.shards.reset_feedback()

    def _op_carry(self, number: int):
        """Fold the pseudo-gradient this island could not send into its next round's."""
        fragment = self.fragment(number)
        for k, pseudo_gradient in self.shards.prepared.items():
            self.shards.feedback[k].carry(pseudo_gradient, self._fragment_start(k, fragment))

    def _op_lr(self, lr: float):
        self.shards.set_lr(lr)

    def _op_restore(self):
        """The fleet's latest durable state, each rank its shards (they agree on the round)."""
        return {"found": self.restore_state(), "round": self.round_have}

    def _op_send_heal(self, island: str, nonce: str, round: int):
        states = {k: self.shards.outer[k].as_tensor() for k in self.shards.mine}
        self._send_heal({"island": island, "nonce": nonce}, round, states)

    def _op_receive_heal(self, donor: str, round: int, nonce: str):
        """Each owned shard from the donor's owner of it; loaded if its MAC holds."""
        ok = True
        for k in self.shards.mine:
            name = heal_shard_group(self.heal_name(round, nonce), k, self.shards.count)
            sealed = self._receive_shard(name, self.shards.size(k) * 2 * 4 + wire.MAC_BYTES)
            context = ("heal", round, donor, self.island, nonce, k)
            state = wire.unseal(sealed, self.token, *context)
            if state is None:
                ok = False
            else:
                self.shards.outer[k].load_tensor(state.view(torch.float32))
        return {"ok": ok}

    def _receive_shard(self, name: str, nbytes: int) -> torch.Tensor:
        """One shard's sealed state from the donor, as it arrived over heal group `name`."""
        sealed = torch.empty(nbytes, dtype=torch.uint8)
        group = self._group(name, rank=1, size=2, nbytes=nbytes)
        group.broadcast(sealed, 0).wait()  # parameters and momentum, fp32, then the MAC
        self.keys.delete(*wire.group_keys(name, 2))  # both ends met: its rendezvous is done
        return sealed

    def _send_heal(self, heal: dict[str, Any], round_number: int, states: dict[int, Any]) -> None:
        """Each owned shard's state to the joiner's owner of it, sealed under the heal."""
        for k, state in states.items():
            context = ("heal", round_number, self.island, heal["island"], heal["nonce"], k)
            sealed = wire.seal(state.view(torch.uint8), self.token, *context)
            try:
                name = self.heal_name(round_number, heal["nonce"], heal["island"])
                name = heal_shard_group(name, k, self.shards.count)
                group = self._group(name, rank=0, size=2, nbytes=sealed.numel())
                group.broadcast(sealed, 0).wait()
            except RuntimeError as exc:  # the joiner died: it will knock again
                log.warning("fleet: healing %s failed (%s)", heal["island"], exc)
                return

    def _all_gather_unless_aborted(self, mine, number: int, attempt: int, members, shard: int):
        """The all-gather of one shard, given up as soon as the coordinator aborts the attempt.

        A member that died before joining leaves the others blocked in gloo's rendezvous until
        the collective timeout; the coordinator notices it within the heartbeat timeout, so the
        survivors retry that much sooner. The abandoned thread ends at gloo's own timeout."""
        outcome: dict[str, Any] = {}

        def gather() -> None:
            try:
                outcome["gathered"] = self._all_gather(mine, number, attempt, members, shard)
            except RuntimeError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=gather, daemon=True, name="ostinato-exchange")
        worker.start()
        orders = wire.Watch(self.keys, wire.ORDERS)
        while worker.is_alive():
            worker.join(0.05)
            if not (worker.is_alive() and orders.moved()):
                continue
            if self._decision(number, attempt) is not None:
                raise RuntimeError(f"the coordinator ended round {number} attempt {attempt}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["gathered"]

    def _all_gather(self, mine, number: int, attempt: int, members: list[str], shard: int):
        """Every member's packed pseudo-gradient of one shard, in member order, over the
        (shaped) link."""
        traffic = mine.numel() * (len(members) - 1)
        position = members.index(self.island)
        name = exchange_group(number, attempt, shard, self.shards.count)
        group = self._group(name, position, len(members), traffic)
        gathered = [torch.empty_like(mine) for _ in members]
        started = time.perf_counter()
        group.allgather([gathered], [mine]).wait()
        self.pad_exchange(started, traffic, traffic)
        self.link_rate.measured(traffic, time.perf_counter() - started)
        return gathered
