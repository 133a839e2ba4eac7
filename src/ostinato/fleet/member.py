"""An island's side of the fleet protocol (DESIGN.md, "The fleet protocol").

The member wraps the island's model with DiLoCo: at the end of its round budget it sends its
compressed pseudo-gradient, and the round's outer step is applied only if the fleet commits it.
Failures are values: an exchange that fails is reported and retried with the survivors, and the
island keeps its inner steps. A member that joins late is healed by a donor from the last
committed round. Heartbeats go over their own connection, from their own thread. With
fleet.fragments > 1 a round carries one fragment of the parameters (fleet/streaming.py).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ostinato.config import FleetConfig, GuardsConfig, budget_of
from ostinato.fleet import wire
from ostinato.fleet.compress import ErrorFeedback, from_bytes, unpack
from ostinato.fleet.guards import pseudo_gradient_outliers
from ostinato.fleet.heartbeat import Heartbeat
from ostinato.fleet.link import parse_link
from ostinato.fleet.outer import OuterState
from ostinato.fleet.streaming import fragment_of

log = logging.getLogger("ostinato")
POLL_S = 0.005


class Refused(ValueError):
    """The coordinator would not take this island; the message says why."""


@dataclass
class RoundOutcome:
    committed: bool  # False: this island missed the round and was healed instead
    final: bool  # the fleet's last round: stop training
    round: int
    exchange_s: float = 0.0
    waiting_s: float = 0.0
    fragment: int | None = None  # what the round synchronised (streaming); None: everything
    reload: str = "all"  # the model takes: "fragment" (the round's), "all" (healed), "" nothing
    checkpoint_by_me: bool = False
    data: dict[str, Any] | None = None  # every member's data position, for the fleet checkpoint


class FleetMember:
    def __init__(
        self,
        cfg: FleetConfig,
        model: nn.Module,
        fingerprint: dict[str, Any],
        guards: GuardsConfig | None = None,
    ):
        self.cfg, self.fingerprint = cfg, fingerprint
        self.guards = guards or GuardsConfig()
        self.island = cfg.island
        self.token = wire.fleet_token(cfg.token)
        self.prefix = wire.namespace(self.token)
        self.outer = OuterState(model, cfg)
        self.feedback = ErrorFeedback(self.outer.numel, cfg.compression, cfg.block)
        self.link = parse_link(cfg.link)
        self.budget_kind, budget = budget_of(cfg)
        self.budget = budget / cfg.fragments  # per round: a fragment's share of H (or T)
        self.total_rounds = int(fingerprint.get("rounds", 0))  # the final round syncs all
        self.round_have = 0  # last committed round whose global state this island holds
        self.role = "member"
        self.nonce = ""
        # Loads the fleet's latest durable state when no donor is left (island.py sets it to
        # read the fleet checkpoint); returns the round that state is of. By default the island
        # keeps the state its own checkpoint gave it.
        self.restore_state = lambda: self.round_have
        self.restored_nonce = self.carried_nonce = ""
        self.keys: wire.Keys | None = None
        self.heartbeat = Heartbeat(cfg, self.island, self.prefix)

    @property
    def active(self) -> bool:
        """False once the fleet has finished its run."""
        return self.role != "finished"

    # --- joining ----------------------------------------------------------------------------

    def start(self, model: nn.Module) -> None:
        """Join the fleet; a joiner is healed by a donor before it trains."""
        self._connect()
        # Beats only once admitted: a restarted island's beats must not make its dead
        # predecessor look alive (and so get itself refused as a second island of that name).
        self._knock(reconnect=False)
        self.heartbeat.start()
        if self.role == "finished":
            log.info("fleet: the fleet has already finished its run")
        elif self.role == "joiner":
            if self._heal():
                self.role = "finished"  # healed at the fleet's last round: nothing left to train
            self.outer.load_into(model)

    def _connect(self) -> None:
        store = wire.connect(self.cfg.coordinator, self.cfg.connect_timeout_s)
        self.keys = wire.Keys(store, self.prefix)
        self.public = wire.Keys(store, "public")

    def _knock(self, reconnect: bool, retry: bool = True) -> None:
        self.nonce = secrets.token_hex(8)
        knock = {
            "island": self.island,
            "nonce": self.nonce,
            "mac": wire.knock_mac(self.token, self.island, self.nonce),
            "fingerprint": self.fingerprint,
            "round_have": self.round_have,
            "reconnect": reconnect,
        }
        # A leading newline ends whatever junk a stranger may have appended before us.
        self.public.view.append(wire.KNOCK, "\n" + json.dumps(knock) + "\n")
        reply = self._wait_for(
            lambda: self.public.get(f"reply/{self.island}/{self.nonce}"), "a reply"
        )
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
        log.info("fleet: joined as %s at round %d", self.role, reply["round"])

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

    def _wait_for(self, probe, what: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.cfg.connect_timeout_s)
        while time.monotonic() < deadline:
            value = probe()
            if value is not None:
                return value
            time.sleep(POLL_S)
        raise TimeoutError(f"fleet: no {what} from the coordinator within the timeout")

    def _heal(self) -> bool:
        """Receive the global parameters and outer state from the donor the coordinator names.
        Returns whether the round it was healed at is the fleet's last."""
        self.heartbeat.status["state"] = "recovering"

        def new_order():
            order = self.keys.get(f"heal/{self.island}/{self.nonce}")
            if order and order["donor"] != self.island and order["round"] > self.round_have:
                return order
            restored = self.restored_nonce == self.nonce != self.carried_nonce
            if order and order["donor"] == self.island and restored:
                return order
            restore = self.keys.get(f"restore/{self.island}/{self.nonce}")
            return restore if restore and self.restored_nonce != self.nonce else None

        order = self._wait_for(new_order, "donor", timeout=24 * 3600.0)
        while "donor" not in order:  # no donor alive: restore durable state, report, wait again
            self._restore()
            order = self._wait_for(new_order, "donor", timeout=24 * 3600.0)
        if order["donor"] == self.island:  # chosen to carry on from what it restored
            self.round_have, self.role, self.carried_nonce = order["round"], "member", self.nonce
            log.warning(
                "fleet: carries the fleet on from restored state at round %d", order["round"]
            )
            return bool(order.get("final"))
        group = self._group(f"healpg/{order['round']}/{self.island}", rank=1, size=2)
        state = self.outer.as_tensor()
        group.broadcast(state, 0).wait()
        self.outer.load_tensor(state)
        self.round_have, self.role = order["round"], "member"
        log.info("fleet: healed from %s at round %d", order["donor"], self.round_have)
        return bool(order.get("final"))

    def _restore(self) -> None:
        """Every member of the last committed round is gone, so nobody can heal this island: load
        the fleet's latest durable state and tell the coordinator which round it is of."""
        from_round = self.restore_state()
        self.restored_nonce = self.nonce
        self.keys.put(f"restored/{self.island}/{self.nonce}", {"from_round": from_round})
        log.warning("fleet: no donor alive; restored the fleet state of round %d", from_round)

    def _serve_heal(self, heal: dict[str, Any], round_number: int, final: bool) -> None:
        order = {"round": round_number, "donor": self.island, "final": final}
        self.keys.put(f"heal/{heal['island']}/{heal['nonce']}", order)
        try:
            group = self._group(f"healpg/{round_number}/{heal['island']}", rank=0, size=2)
            group.broadcast(self.outer.as_tensor(), 0).wait()
        except RuntimeError as exc:  # the joiner died: it will knock again
            log.warning("fleet: healing %s failed (%s)", heal["island"], exc)

    def _group(self, name: str, rank: int, size: int) -> dist.ProcessGroup:
        # A store connection of its own: a client serves one request at a time, and a peer that
        # died leaves gloo's rendezvous blocked on it, which must not block polling the
        # coordinator (or the next attempt's rendezvous).
        own = wire.connect(self.cfg.coordinator, self.cfg.connect_timeout_s)
        store = dist.PrefixStore(f"{self.prefix}/{name}", own)
        return dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=self.cfg.timeout_s))

    # --- rounds -----------------------------------------------------------------------------

    def round_due(self, steps_in_round: int, seconds_in_round: float) -> bool:
        if self.budget_kind == "steps":
            return steps_in_round >= self.budget
        return seconds_in_round >= self.budget

    def sync(self, model: nn.Module, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        """Take part in the next round until it commits, then take its result into the model."""
        outcome = self.exchange(self.pseudo_gradient(model), tokens, data)
        self.take(model, outcome)
        return outcome

    def fragment(self, number: int) -> int | None:
        """What round `number` synchronises (fleet/streaming.py)."""
        return fragment_of(number, self.cfg.fragments, self.total_rounds)

    def pseudo_gradient(self, model: nn.Module) -> torch.Tensor:
        """This island's pseudo-gradient for its next round: that round's fragment."""
        return self.outer.pseudo_gradient(model, self.fragment(self.round_have + 1))

    def exchange(self, pseudo_gradient, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        """Take part in the next round until it commits (retrying attempts as members fail).
        Touches no model, so it can run while the island trains on (fleet.overlap).

        If the coordinator goes away, reconnect, say where this island stands, and go on.
        """
        while True:
            try:
                return self._sync_once(pseudo_gradient, tokens, data)
            except (dist.DistNetworkError, dist.DistStoreError) as exc:
                log.warning("fleet: lost the coordinator (%s); reconnecting", str(exc)[:120])
                self.outer.abort()
                self._connect()
                self._knock(reconnect=True)
                if self.role != "member":
                    return self._rejoin(pseudo_gradient)

    def take(self, model: nn.Module, outcome: RoundOutcome, mix: float = 0.0) -> None:
        """The model takes the round's global parameters: the fragment it synchronised, merged
        as local = mix * local + (1 - mix) * global; or all of them after a heal."""
        if outcome.reload == "fragment":
            self.outer.merge_into(model, outcome.fragment, mix)
        elif outcome.reload == "all":
            self.outer.load_into(model)

    def _sync_once(self, pseudo_gradient, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        self.heartbeat.status["state"] = "syncing"
        number = self.round_have + 1
        assert pseudo_gradient.numel() == self.outer.size(self.fragment(number))
        ready = {"tokens": tokens, "data": data, "nonce": self.nonce}
        self.keys.put(f"ready/{number}/{self.island}", ready)
        waited, tried = time.perf_counter(), -1
        while True:
            record = self.keys.get(f"round/{number}")
            order = self.keys.get(f"heal/{self.island}/{self.nonce}")
            if order and order["round"] > self.round_have:  # the fleet moved on without us
                log.warning("fleet: the coordinator found this island behind the fleet")
                return self._rejoin(pseudo_gradient)
            if (
                record
                and record.get("decision") == "commit"
                and self.island not in record["members"]
            ):
                log.warning("fleet: round %d committed without this island", number)
                self._knock(reconnect=True)
                return self._rejoin(pseudo_gradient)
            if record and record["attempt"] > tried and self.island in record["members"]:
                if record.get("decision") is None:
                    waiting_s = time.perf_counter() - waited
                    outcome = self._attempt(pseudo_gradient, tokens, number, record)
                    if outcome is not None:
                        outcome.waiting_s += waiting_s
                        return outcome
                    waited = time.perf_counter()
                tried = record["attempt"]
            time.sleep(POLL_S)

    def _attempt(self, pseudo_gradient, tokens, number, record) -> RoundOutcome | None:
        attempt, members = record["attempt"], record["members"]
        fragment = self.fragment(number)
        started = time.perf_counter()
        packed = self.feedback.compress(pseudo_gradient, self.outer.span(fragment)[0])
        count = torch.tensor([float(tokens)], dtype=torch.float64).view(torch.uint8)
        mine = torch.cat([packed.to_bytes(), count])
        try:
            gathered = self._all_gather_unless_aborted(mine, number, attempt, members)
        except RuntimeError as exc:  # a peer died or stalled: report, then retry with survivors
            log.warning("fleet: round %d attempt %d failed: %s", number, attempt, str(exc)[:200])
            gathered = None
        if gathered is None:
            result = {"ok": False, "digest": None, "bytes_sent": 0, "tokens": tokens}
        else:
            averaged, excluded = self._average(gathered, members, fragment)
            digest = self.outer.tentative_step(averaged, fragment)
            sent = mine.numel() * (len(members) - 1)
            result = {"ok": True, "digest": digest, "bytes_sent": sent, "tokens": tokens}
            result["excluded"] = excluded
        exchange_s = time.perf_counter() - started
        self.keys.put(
            f"result/{number}/{attempt}/{self.island}", {**result, "exchange_s": exchange_s}
        )
        decision = self._wait_for(lambda: self._decision(number, attempt), "decision", 3600.0)
        if decision.get("decision") != "commit":
            self.outer.abort()
            time.sleep(min(1.0, 0.05 * (attempt + 1)))  # back off before the retry
            return None
        if self.island not in decision["members"]:
            return self._quarantined(decision, number)
        self.outer.commit()
        if self.island in result.get("excluded", []):
            self.feedback.reset()  # this round's work was left out: do not carry its error
        else:
            self.feedback.commit()
        self.round_have = number
        for heal in decision.get("heal", []):
            if heal["donor"] == self.island:
                self._serve_heal(heal, number, decision.get("final", False))
        return RoundOutcome(
            committed=True,
            final=decision.get("final", False),
            round=number,
            exchange_s=exchange_s,
            checkpoint_by_me=decision.get("checkpoint_by") == self.island,
            data=decision.get("data"),
            fragment=fragment,
            reload="fragment",
        )

    def _decision(self, number: int, attempt: int) -> dict[str, Any] | None:
        record = self.keys.get(f"round/{number}")
        if record is None or record["attempt"] < attempt:
            return None
        if record["attempt"] > attempt:
            return {"decision": "abort"}
        return record if record.get("decision") else None

    def _all_gather_unless_aborted(self, mine, number: int, attempt: int, members: list[str]):
        """The all-gather, given up as soon as the coordinator aborts the attempt.

        A member that died before joining leaves the others blocked in gloo's rendezvous until
        the collective timeout; the coordinator notices it within the heartbeat timeout, so the
        survivors retry that much sooner. The abandoned thread ends at gloo's own timeout."""
        outcome: dict[str, Any] = {}

        def gather() -> None:
            try:
                outcome["gathered"] = self._all_gather(mine, number, attempt, members)
            except RuntimeError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=gather, daemon=True, name="ostinato-exchange")
        worker.start()
        while worker.is_alive():
            worker.join(POLL_S * 10)
            if worker.is_alive() and self._decision(number, attempt) is not None:
                raise RuntimeError(f"the coordinator ended round {number} attempt {attempt}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["gathered"]

    def _all_gather(self, mine: torch.Tensor, number: int, attempt: int, members: list[str]):
        """Every member's packed pseudo-gradient, in member order, over the (shaped) link."""
        group = self._group(f"pg/{number}/{attempt}", members.index(self.island), len(members))
        gathered = [torch.empty_like(mine) for _ in members]
        started = time.perf_counter()
        group.allgather([gathered], [mine]).wait()
        traffic = mine.numel() * (len(members) - 1)
        self.link.pad(started, traffic, traffic)
        return gathered

    def _average(
        self, gathered: list[torch.Tensor], members: list[str], fragment: int | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Token-weighted mean of the pseudo-gradients (of `fragment`; None: everything) that
        pass the outlier guard, summed in member order so every member gets the same bits; and
        the members left out."""
        numel, cfg = self.outer.size(fragment), self.cfg
        weights = [float(raw[-8:].clone().view(torch.float64)) for raw in gathered]
        peers = [
            unpack(from_bytes(raw[:-8], numel, cfg.compression, cfg.block), cfg.block)
            for raw in gathered
        ]
        norms = [float(p.double().norm()) for p in peers]
        left_out = pseudo_gradient_outliers(norms, self.guards.outlier_ratio)
        if len(left_out) == len(peers):
            left_out = []  # nothing to compare against: let the digest guard judge
        total = sum(w for i, w in enumerate(weights) if i not in left_out) or 1.0
        averaged = torch.zeros(numel)
        for i, (peer, weight) in enumerate(zip(peers, weights, strict=True)):
            if i not in left_out:
                averaged += (weight / total) * peer
        return averaged, [members[i] for i in left_out]

    def _quarantined(self, decision: dict[str, Any], number: int) -> RoundOutcome:
        """The fleet committed the round without this island: its global state disagreed with
        the majority's (silent corruption). Drop this round's work and take a donor's state."""
        log.warning("fleet: quarantined in round %d; healing from a donor", number)
        self.outer.abort()
        self.feedback.reset()  # the residual may hold the corruption too
        self._heal()
        return RoundOutcome(committed=False, final=decision.get("final", False), round=number)

    def _rejoin(self, pseudo_gradient) -> RoundOutcome:
        """This island is behind the fleet: keep its work for its next round, get healed."""
        self.feedback.carry(pseudo_gradient, self.outer.span(self.fragment(self.round_have + 1))[0])
        if self.role == "finished":
            return RoundOutcome(committed=False, final=True, round=self.round_have, reload="")
        final = self._heal()  # healed at the last round: the run is over for this island too
        return RoundOutcome(committed=False, final=final, round=self.round_have)

    def close(self) -> None:
        self.heartbeat.status["state"] = "done"
        self.heartbeat.stop()
