"""An island's side of the fleet protocol (DESIGN.md, "The fleet protocol").

The member wraps the island's model with DiLoCo: at the end of its round budget it sends its
compressed pseudo-gradient, and the round's outer step is applied only if the fleet commits it.
Failures are values: an exchange that fails is reported and retried with the survivors, and the
island keeps its inner steps. A member that joins late is healed by a donor from the last
committed round. Heartbeats go over their own connection, from their own thread. With
fleet.fragments > 1 a round carries one fragment of the parameters (fleet/streaming.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ostinato.config import FleetConfig, GuardsConfig, budget_of
from ostinato.fleet import wire
from ostinato.fleet.compress import ErrorFeedback, from_bytes, message_bytes, pack, unpack
from ostinato.fleet.deadlines import LinkRate
from ostinato.fleet.guards import pseudo_gradient_outliers
from ostinato.fleet.heartbeat import Heartbeat
from ostinato.fleet.joining import (  # noqa: F401 (Refused: public)
    ASKED_POLL_S,
    POLL_S,
    Joining,
    Refused,
)
from ostinato.fleet.outer import OuterState
from ostinato.fleet.streaming import fragment_of

log = logging.getLogger("ostinato")


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


class FleetMember(Joining):
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
        # Called after each exchange with (perf_counter at its start, bytes out, bytes in): the
        # `link` fault sets it to sleep as a slower link would (fleet/link.py); by default nothing.
        self.pad_exchange: Callable[[float, int, int], None] = lambda started, out, back: None
        self.budget_kind, budget = budget_of(cfg)
        self.budget = budget / cfg.fragments  # per round: a fragment's share of H (or T)
        self.warm_rounds = cfg.warm_start_steps  # the first rounds: one step each (a warm start)
        self.total_rounds = int(fingerprint.get("rounds", 0))  # the final round syncs all
        self.round_have = 0  # last committed round whose global state this island holds
        self.role = "member"
        self.nonce = ""
        # Loads the fleet's latest durable state when no donor is left (island.py sets it to
        # read the fleet checkpoint); returns the round that state is of. By default the island
        # keeps the state its own checkpoint gave it.
        self.restore_state = lambda: self.round_have
        self.restored_nonce = self.carried_nonce = ""
        self.status_read_at = 0.0  # when _forgotten last read the coordinator's status
        self.refused_heal = 0  # the round of the last heal order whose payload failed its MAC
        self.device: dist.ProcessGroupGloo.Device | None = None  # gloo's, for every group
        self.keys: wire.Keys | None = None
        self.heartbeat = Heartbeat(cfg, self.island, self.token)
        self.link_rate = LinkRate()  # of the last exchange: deadlines follow it if it is slow

    @property
    def active(self) -> bool:
        """False once the fleet has finished its run."""
        return self.role != "finished"

    # --- rounds -----------------------------------------------------------------------------

    def warm(self, number: int) -> bool:
        """Whether round `number` is one of the warm start's (fleet.warm_start_steps): after a
        single inner step, in fp32, the islands' parameters are averaged (outer lr 1, no
        momentum), which is synchronous training across the islands."""
        return number <= self.warm_rounds

    def compression(self, number: int) -> str:
        return "fp32" if self.warm(number) else self.cfg.compression

    def round_due(self, steps_in_round: int, seconds_in_round: float) -> bool:
        if self.warm(self.round_have + 1):
            due = steps_in_round >= 1
        elif self.budget_kind == "steps":
            due = steps_in_round >= self.budget
        else:
            due = seconds_in_round >= self.budget
        return due or (self.fresh and steps_in_round > 0 and self._hurried())

    def _hurried(self) -> bool:
        """Healed mid-round: whether the others are ready and wait for this island, which then
        ends its round now, with fewer inner steps (fleet/prompt_heal.py)."""
        now = time.monotonic()
        if self.keys is None or now - self.asked_read_at < ASKED_POLL_S:
            return False
        self.asked_read_at = now
        hurry = self.read_quietly(f"hurry/{self.round_have + 1}") or {}
        return self.island in hurry.get("islands", [])

    def sync(self, model: nn.Module, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        """Take part in the next round until it commits, then take its result into the model."""
        outcome = self.exchange(self.pseudo_gradient(model), tokens, data)
        self.take(model, outcome)
        return outcome

    def fragment(self, number: int) -> int | None:
        """What round `number` synchronises (fleet/streaming.py)."""
        return fragment_of(number, self.cfg.fragments, self.total_rounds, self.warm_rounds)

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
        self.heal_sent()  # a heal served mid-round uses the gloo device too: let it finish
        number = self.round_have + 1
        assert pseudo_gradient.numel() == self.outer.size(self.fragment(number))
        ready = {"tokens": tokens, "data": data, "nonce": self.nonce}
        # what the coordinator's exchange deadline allows for (fleet/deadlines.py)
        size = self.outer.size(self.fragment(number))
        ready |= {"bytes": message_bytes(size, self.compression(number), self.cfg.block)}
        ready |= {"rate": self.link_rate.bytes_per_s}
        self.keys.put(f"ready/{number}/{self.island}", ready)
        self.heartbeat.news()
        waited, tried = time.perf_counter(), -1
        orders = wire.Watch(self.keys, wire.ORDERS)
        while True:
            if not orders.moved():
                time.sleep(POLL_S)
                continue
            record = self.keys.get(f"round/{number}")
            order = self.keys.get(f"heal/{self.island}/{self.nonce}")
            if order and order["round"] > max(self.round_have, self.refused_heal):
                log.warning("fleet: the coordinator found this island behind the fleet")
                return self._rejoin(pseudo_gradient)
            without_us = record and self.island not in record["members"]
            if (without_us and record.get("decision") == "commit") or self._forgotten(
                record, number
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

    def _forgotten(self, record: dict[str, Any] | None, number: int) -> bool:
        """Whether round `number` is committed and its keys deleted (coordinator.KEPT_ROUNDS):
        this island, ready for it, was away too long. The status is read once a second."""
        now = time.monotonic()
        if record is not None or now - self.status_read_at < 1.0:
            return False
        self.status_read_at = now
        return self.keys.get("status", {}).get("last_committed", 0) >= number

    def _attempt(self, pseudo_gradient, tokens, number, record) -> RoundOutcome | None:
        attempt, members = record["attempt"], record["members"]
        fragment = self.fragment(number)
        started = time.perf_counter()
        if self.warm(number):  # exact, so no quantization error to feed back
            packed = pack(pseudo_gradient, "fp32", self.cfg.block)
        else:
            packed = self.feedback.compress(pseudo_gradient, self.outer.span(fragment)[0])
        count = torch.tensor([float(tokens)], dtype=torch.float64).view(torch.uint8)
        context = ("pseudo-gradient", number, attempt)  # and the sender: bound to this attempt
        mine = wire.seal(torch.cat([packed.to_bytes(), count]), self.token, *context, self.island)
        assert mine.numel() == message_bytes(packed.numel, packed.kind, self.cfg.block)
        try:
            gathered = self._all_gather_unless_aborted(mine, number, attempt, members)
        except RuntimeError as exc:  # a peer died or stalled: report, then retry with survivors
            log.warning("fleet: round %d attempt %d failed: %s", number, attempt, str(exc)[:200])
            gathered = None
        result = {"ok": False, "digest": None, "bytes_sent": 0, "tokens": tokens}
        if gathered is not None:
            result = self._step_on(gathered, members, context, number)
            result.update(bytes_sent=mine.numel() * (len(members) - 1), tokens=tokens)
        exchange_s = time.perf_counter() - started
        self.keys.put(
            f"result/{number}/{attempt}/{self.island}", {**result, "exchange_s": exchange_s}
        )
        self.heartbeat.news()
        decision = self._wait_for(lambda: self._decision(number, attempt), "decision", 3600.0)
        if decision.get("decision") != "commit":
            self.outer.abort()
            time.sleep(min(1.0, 0.05 * (attempt + 1)))  # back off before the retry
            return None
        if self.island not in decision["members"]:
            return self._quarantined(decision, number)
        self.outer.commit()
        self.fresh = False
        if self.island in result["excluded"] + result["refused"]:
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

    def _step_on(self, gathered, members: list[str], context: tuple, number: int):
        """The tentative outer step of round `number` on the payloads whose MAC holds. A payload
        that fails it was changed on its way: its sender is refused (left out, reported as its
        fault). A warm-start round's step is the plain average."""
        opened = [
            wire.unseal(raw, self.token, *context, sender)
            for raw, sender in zip(gathered, members, strict=True)
        ]
        refused = [m for m, payload in zip(members, opened, strict=True) if payload is None]
        if refused:
            log.warning("fleet: %s: refused the payload of %s (bad MAC)", context, refused)
        kept = [m for m in members if m not in refused]
        payloads = [payload for payload in opened if payload is not None]
        fragment = self.fragment(number)
        averaged, excluded = self._average(payloads, kept, fragment, self.compression(number))
        if self.warm(number):
            digest = self.outer.tentative_average(averaged)
        else:
            digest = self.outer.tentative_step(averaged, fragment)
        return {"ok": True, "digest": digest, "excluded": excluded, "refused": refused}

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
        orders = wire.Watch(self.keys, wire.ORDERS)
        while worker.is_alive():
            worker.join(POLL_S * 10)
            if not (worker.is_alive() and orders.moved()):
                continue
            if self._decision(number, attempt) is not None:
                raise RuntimeError(f"the coordinator ended round {number} attempt {attempt}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["gathered"]

    def _all_gather(self, mine: torch.Tensor, number: int, attempt: int, members: list[str]):
        """Every member's packed pseudo-gradient, in member order, over the (shaped) link."""
        traffic = mine.numel() * (len(members) - 1)
        position = members.index(self.island)
        group = self._group(f"pg/{number}/{attempt}", position, len(members), traffic)
        gathered = [torch.empty_like(mine) for _ in members]
        started = time.perf_counter()
        group.allgather([gathered], [mine]).wait()
        self.pad_exchange(started, traffic, traffic)
        self.link_rate.measured(traffic, time.perf_counter() - started)
        return gathered

    def _average(
        self,
        gathered: list[torch.Tensor],
        members: list[str],
        fragment: int | None = None,
        kind: str | None = None,
    ) -> tuple[torch.Tensor, list[str]]:
        """Token-weighted mean of the pseudo-gradients (of `fragment`; None: everything) that
        pass the outlier guard, summed in member order so every member gets the same bits; and
        the members left out."""
        numel, cfg = self.outer.size(fragment), self.cfg
        kind = kind or cfg.compression
        weights = [float(raw[-8:].clone().view(torch.float64)) for raw in gathered]
        peers = [
            unpack(from_bytes(raw[:-8], numel, kind, cfg.block), cfg.block) for raw in gathered
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
        number = self.round_have + 1
        if not self.warm(number):  # a warm-start step missed is lost: the heal brings the average
            self.feedback.carry(pseudo_gradient, self.outer.span(self.fragment(number))[0])
        if self.role == "finished":
            return RoundOutcome(committed=False, final=True, round=self.round_have, reload="")
        final = self._heal()  # healed at the last round: the run is over for this island too
        return RoundOutcome(committed=False, final=final, round=self.round_have)

    def close(self) -> None:
        self.heal_sent()
        self.heartbeat.status["state"] = "done"
        self.heartbeat.stop()
