"""An island's way into the fleet, the member's half of membership (fleet/membership.py):
joining by challenge-response, healing from a donor (the fleet state travels sealed with a MAC;
one that fails it is refused, reported as the donor's fault, and healed again by another donor),
restoring the fleet's durable state when no donor is left, and healing others as a donor.

Every exchange group's gloo device listens on this machine's address towards the coordinator.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch.distributed as dist
from torch import nn

from ostinato import errors
from ostinato.config import FleetConfig
from ostinato.fleet import wire
from ostinato.fleet.crew import Crew
from ostinato.fleet.deadlines import collective_timeout_s
from ostinato.fleet.heartbeat import Heartbeat
from ostinato.fleet.membership import knock
from ostinato.fleet.shards import ShardSet

log = logging.getLogger("ostinato")
POLL_S = 0.005
ASKED_POLL_S = 0.1  # how often a training member looks for a heal asked of it (one store read)


def heal_group(round_number: int, joiner: str, nonce: str) -> str:
    """The name of the gloo group of one heal: of the joiner's admission (nonce), so a heal at
    commit and one asked mid-round, or two admissions of one island, never share a rendezvous."""
    return f"healpg/{round_number}/{joiner}/{nonce}"


class Refused(errors.Refused):  # its own exit code (ostinato.errors)
    """The coordinator would not take this island; the message says why."""


class Joining:
    """Mixed into FleetMember, which sets these up."""

    cfg: FleetConfig
    island: str
    token: str
    prefix: str
    fingerprint: dict[str, Any]
    shards: ShardSet
    crew: Crew
    total_rounds: int
    heartbeat: Heartbeat
    keys: wire.Keys | None
    public: wire.Keys
    role: str
    nonce: str
    round_have: int
    restored_nonce: str
    carried_nonce: str
    refused_heal: int  # the round of the last heal order whose payload failed its MAC
    device: dist.ProcessGroupGloo.Device | None  # gloo's, shared by every group
    joined_at: float | None = None  # when this process was admitted
    fresh: bool = False  # healed mid-round (fleet/prompt_heal.py): may be told to end it early
    asked_read_at: float = 0.0  # when serve_asked_heal last looked for a request
    serving: threading.Thread | None = None  # a heal being sent in the background

    def start(self, model: nn.Module) -> None:
        """Join the fleet (the island's leader; its other ranks `follow_start`). A joiner is
        healed by a donor before it trains; an island that comes back after the fleet finished
        (a late restart) ends with the fleet's final state, from the final fleet checkpoint.
        Then every rank's model takes the global parameters if they changed."""
        self._connect()
        # Beats only once admitted: a restarted island's beats must not make its dead
        # predecessor look alive (and so get itself refused as a second island of that name).
        self._knock(reconnect=False)
        self.joined_at = time.time()  # the start's `join` phase ends here (ostinato.startup)
        self.heartbeat.start()
        load = False
        if self.role == "finished":
            log.info("fleet: the fleet has already finished its run")
            load = self._catch_up()
        elif self.role == "joiner":
            if self._heal():
                self.role = "finished"  # healed at the fleet's last round: nothing left to train
            load = True
        self.crew.end({"load": load, "round_have": self.round_have, "role": self.role})
        if load:
            self.shards.write(model, None)

    def follow_start(self, model: nn.Module) -> None:
        """An island's other ranks, while the leader joins: follow, then take what it took."""
        joined = self.crew.follow()
        self.round_have, self.role = joined["round_have"], joined["role"]
        if joined["load"]:
            self.shards.write(model, None)

    def _catch_up(self) -> bool:
        """The fleet has finished: wait for its final fleet checkpoint (written just after
        the final commit) and restore it; whether anything was restored."""
        loaded = False
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        while self.round_have < self.total_rounds and time.monotonic() < deadline:
            found = self.crew.run("restore")[0]["found"]
            loaded = loaded or found
            if self.round_have < self.total_rounds:
                time.sleep(0.2)
        return loaded

    def heal_name(self, round_number: int, nonce: str, joiner: str = "") -> str:
        return heal_group(round_number, joiner or self.island, nonce)

    def _connect(self) -> None:
        store = wire.connect(self.cfg.coordinator, self.cfg.connect_timeout_s)
        self.keys = wire.Keys(store, self.prefix)
        self.public = wire.Keys(store, "public")

    def _knock(self, reconnect: bool, retry: bool = True) -> None:
        """Join by challenge-response (fleet/membership.py)."""
        answer = {
            "fingerprint": self.fingerprint,
            "round_have": self.round_have,
            # which state of that round: a carried-on restore relabels an older state as the
            # last round, so a round number may name two
            "digest": self.digest(),
            "reconnect": reconnect,
        }
        for _ in range(3):  # a spent challenge: the coordinator restarted between two steps
            self.nonce, reply = knock(self.public, self.token, self.island, answer, self._wait_for)
            if not reply.get("retry"):
                break
        else:  # transient (exit 4): the supervisor restarts the island
            raise wire.Unreachable(f"fleet: island {self.island!r}: {reply['reason']}")
        if reply.get("finished"):
            self.role = "finished"
            return
        if not reply["ok"] and "already in the fleet" in reply["reason"] and retry:
            # our own previous process, just killed, until its heartbeats are missed
            return self._knock_again(reply)
        if not reply["ok"]:
            raise Refused(
                f"the fleet coordinator refused island {self.island!r}: {reply['reason']}"
            )
        self.role = reply["role"]
        self._take_outer_lr(reply.get("outer_lr"))
        self.heartbeat.nonce = self.nonce  # its liveness connection follows the admission
        log.info("fleet: joined as %s at round %d", self.role, reply["round"])

    def _take_outer_lr(self, lr: Any) -> None:
        """The outer rate the coordinator resolved for the fleet (fleet.outer_lr = "auto")."""
        if not isinstance(lr, int | float) or isinstance(lr, bool) or not 0.0 <= lr <= 10.0:
            raise Refused(f"the fleet coordinator sent an outer learning rate of {lr!r}")
        if lr != self.outer.lr:
            log.info("fleet: outer learning rate %g, as the coordinator resolved it", lr)
        self.crew.run("lr", lr=float(lr))

    def _knock_again(self, reply: dict[str, Any]) -> None:
        """Knock until the namesake counts as gone; refused if it is still alive by then."""
        deadline = time.monotonic() + 2 * self.cfg.heartbeat_timeout_s + 1.0
        while time.monotonic() < deadline:
            time.sleep(self.cfg.heartbeat_s)
            try:
                return self._knock(reconnect=False, retry=False)
            except Refused as exc:
                if "already in the fleet" not in str(exc):
                    raise
        raise Refused(f"the fleet coordinator refused island {self.island!r}: {reply['reason']}")

    def _wait_for(self, probe, what: str, timeout: float | None = None, every_s: float = 0.0):
        """The probe's first value that is not None, probed whenever the coordinator announces
        writes (wire.ORDERS), and every `every_s` seconds too if set (for keys written without
        announcing, such as its status)."""
        deadline = time.monotonic() + (timeout or self.cfg.connect_timeout_s)
        orders = wire.Watch(self.keys, wire.ORDERS)
        probed = time.monotonic()
        while time.monotonic() < deadline:
            if orders.moved() or (every_s and time.monotonic() - probed >= every_s):
                probed = time.monotonic()
                value = probe()
                if value is not None:
                    return value
            time.sleep(POLL_S)
        # transient (exit 4): the supervisor restarts the island, which knocks again
        raise wire.Unreachable(f"fleet: no {what} from the coordinator within the timeout")

    def _heal(self) -> bool:
        """Receive the global parameters and outer state from the donor the coordinator names.
        Returns whether the round it was healed at is the fleet's last. A heal that fails its
        MAC is reported (a fault of the donor) and waited for again, from another donor."""
        self.heartbeat.status["state"] = "recovering"
        while True:
            probe = self._heal_order_or_end
            order = self._wait_for(probe, "donor", timeout=24 * 3600.0, every_s=1.0)
            if order.get("finished"):
                return self._end_unhealed()
            if "donor" not in order:  # no donor alive: restore durable state, report, wait
                self._restore()
            elif order["donor"] == self.island:  # chosen to carry on from what it restored
                self.round_have, self.role = order["round"], "member"
                self.carried_nonce = self.nonce
                log.warning(
                    "fleet: carries the fleet on from restored state at round %d", order["round"]
                )
                return bool(order.get("final"))
            elif self._take_heal(order):
                return bool(order.get("final"))

    def _heal_order_or_end(self) -> dict[str, Any] | None:
        """A heal order to follow, or {"finished": True} once the coordinator says the fleet
        has finished its run: a joiner its final round did not heal (one admitted too late to
        count as alive at that commit, as after a coordinator restart) gets no order any more."""
        order = self._heal_order()
        status = self.keys.get("status", {}) if order is None else {}
        if not status.get("finished"):
            return order
        final = self.keys.get(f"round/{status.get('last_committed')}") or {}
        me = {"island": self.island, "nonce": self.nonce}
        if any(me.items() <= heal.items() for heal in final.get("heal", [])):
            return None  # the final round heals this island: its donor's order is on its way
        return {"finished": True}

    def _end_unhealed(self) -> bool:
        """The fleet finished while this island waited for a heal: it ends with the fleet's
        final state, from the final fleet checkpoint (written just after the final commit)."""
        log.warning("fleet: the fleet finished while this island waited to be healed")
        self.role = "finished"
        if not self._catch_up():
            log.warning(
                "fleet: no final fleet checkpoint found; ending with round %d's state",
                self.round_have,
            )
        return True

    def _heal_order(self) -> dict[str, Any] | None:
        """A heal order not yet followed (or, with no donor left, an order to restore)."""
        order = self.keys.get(f"heal/{self.island}/{self.nonce}")
        newer = order and order["round"] > max(self.round_have, self.refused_heal)
        if newer and order["donor"] != self.island:
            return order
        restored = self.restored_nonce == self.nonce != self.carried_nonce
        if order and order["donor"] == self.island and restored:
            return order
        restore = self.keys.get(f"restore/{self.island}/{self.nonce}")
        return restore if restore and self.restored_nonce != self.nonce else None

    def _take_heal(self, order: dict[str, Any]) -> bool:
        """Load the donor's fleet state, shard by shard on every rank, if its MAC holds; else
        report the donor."""
        received = self.crew.run(
            "receive_heal", donor=order["donor"], round=order["round"], nonce=self.nonce
        )
        if not all(r["ok"] for r in received):
            log.warning("fleet: the heal from %s failed its MAC; refused", order["donor"])
            self.refused_heal = order["round"]
            report = {"round": order["round"], "donor": order["donor"]}
            self.keys.put(f"healbad/{self.island}/{self.nonce}", report)
            return False
        self.round_have, self.role = order["round"], "member"
        self.fresh = bool(order.get("now"))
        log.info("fleet: healed from %s at round %d", order["donor"], self.round_have)
        return True

    def _restore(self) -> None:
        """Every member of the last committed round is gone, so nobody can heal this island: load
        the fleet's latest durable state and tell the coordinator which round it is of."""
        from_round = self.crew.run("restore")[0]["round"]
        self.restored_nonce = self.nonce
        report = {"from_round": from_round, "digest": self.digest()}
        self.keys.put(f"restored/{self.island}/{self.nonce}", report)
        log.warning("fleet: no donor alive; restored the fleet state of round %d", from_round)

    def serve_asked_heal(self) -> None:
        """Before an inner step: heal a joiner now if the coordinator asked (prompt_heal.py).
        The state is copied here, between steps, and sent from a thread: the island trains on,
        and its fleet state changes only at its next commit, after this round's exchange.
        An island of several ranks does not: its shards are on ranks busy training (it heals
        the joiner at its next commit, which the coordinator falls back to)."""
        now = time.monotonic()
        if self.keys is None or self.crew.ranks > 1 or now - self.asked_read_at < ASKED_POLL_S:
            return
        self.asked_read_at = now
        asked = self.read_quietly(f"healnow/{self.island}")
        if asked is None or asked.get("round") != self.round_have or self.serving is not None:
            return
        self.keys.delete(f"healnow/{self.island}")
        heal = {"island": str(asked["island"]), "nonce": str(asked["nonce"])}
        order = {"round": self.round_have, "donor": self.island, "final": False, "now": True}
        self.keys.put(f"heal/{heal['island']}/{heal['nonce']}", order)
        self.keys.bump(wire.ORDERS)  # the joiner waits for this order, not only the coordinator's
        states = {k: self.shards.outer[k].as_tensor().clone() for k in self.shards.mine}
        self.serving = threading.Thread(
            target=self._send_heal, args=(heal, self.round_have, states), daemon=True
        )
        self.serving.start()

    def read_quietly(self, key: str) -> Any:
        """A key read between inner steps; None while the coordinator is away (it restarts: the
        next exchange reconnects)."""
        try:
            return self.keys.get(key)
        except (RuntimeError, dist.DistStoreError, dist.DistNetworkError):
            return None

    def heal_sent(self) -> None:
        """Wait for a heal in flight (before this island's next exchange, and when leaving)."""
        if self.serving is not None:
            self.serving.join()
            self.serving = None

    def _serve_heal(self, heal: dict[str, Any], round_number: int, final: bool) -> None:
        order = {"round": round_number, "donor": self.island, "final": final}
        self.keys.put(f"heal/{heal['island']}/{heal['nonce']}", order)
        self.keys.bump(wire.ORDERS)  # the joiner waits for this order, not only the coordinator's
        self.crew.run("send_heal", island=heal["island"], nonce=heal["nonce"], round=round_number)

    def _group(self, name: str, rank: int, size: int, nbytes: float = 0) -> dist.ProcessGroup:
        """A gloo group of its own for one transfer of `nbytes` into this member, with a timeout
        that allows for them on the link (fleet/deadlines.py)."""
        # A store connection of its own: a client serves one request at a time, and a peer that
        # died leaves gloo's rendezvous blocked on it, which must not block polling the
        # coordinator (or the next attempt's rendezvous).
        own = wire.connect(self.cfg.coordinator, self.cfg.connect_timeout_s)
        store = dist.PrefixStore(f"{self.prefix}/{name}", own)
        if self.device is None:  # listens on this machine's address towards the coordinator
            self.device = wire.gloo_device(self.cfg.coordinator)
        timeout = collective_timeout_s(self.cfg, nbytes, self.link_rate.bytes_per_s)
        return wire.gloo_group(store, rank, size, timeout, self.device)
