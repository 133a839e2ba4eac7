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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import nn

from ostinato.config import FleetConfig, GuardsConfig, budget_of
from ostinato.fleet import wire
from ostinato.fleet.compress import message_bytes
from ostinato.fleet.crew import Crew
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
from ostinato.fleet.shard_ops import ShardOps
from ostinato.fleet.shards import ShardSet, island_digest
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


def keep(
    opened: list[dict[str, Any]], members: list[str], outlier_ratio: float
) -> tuple[list[str], list[str], list[str]]:
    """Whose pseudo-gradients a round averages, from every rank's report of its shards
    (shard_ops.py): not those refused for a bad MAC in any shard, nor those whose norm over
    all shards is an outlier. Returns (used, excluded as outliers, refused), in member order."""
    refused = [m for m in members if any(m in r["refused"] for r in opened)]
    kept = [m for m in members if m not in refused]
    norms = [math.sqrt(sum(r["squares"].get(m, 0.0) for r in opened)) for m in kept]
    left_out = pseudo_gradient_outliers(norms, outlier_ratio)
    if len(left_out) == len(kept):
        left_out = []  # nothing to compare against: let the digest guard judge
    excluded = [kept[i] for i in left_out]
    return [m for m in kept if m not in excluded], excluded, refused


class FleetMember(Joining, ShardOps):
    """One island's member of the fleet. Every rank of the island builds one (`rank` of
    `ranks`): each holds its own fleet shards (fleet/shards.py); only the leader's (rank 0)
    talks to the coordinator, and runs each step that touches fleet state on all of them
    through its crew (fleet/crew.py)."""

    def __init__(
        self,
        cfg: FleetConfig,
        model: nn.Module,
        fingerprint: dict[str, Any],
        guards: GuardsConfig | None = None,
        rank: int = 0,
        ranks: int = 1,
    ):
        self.cfg, self.fingerprint = cfg, fingerprint
        self.guards = guards or GuardsConfig()
        self.island = cfg.island
        self.token = wire.fleet_token(cfg.token)
        self.prefix = wire.namespace(self.token)
        self.keys: wire.Keys | None = None
        self.crew = Crew(rank, ranks, self.handle)
        self.shards = ShardSet(model, cfg, rank, ranks, self.crew.group)
        self.opened = {}  # shard -> the payloads of the round being exchanged
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
        # Loads the fleet's latest durable state into this rank's shards when no donor is left
        # (island.py sets it to read the fleet checkpoint; every rank of the island runs it) and
        # sets round_have; returns whether there was one. By default the island keeps the state
        # its own checkpoint gave it.
        self.restore_state: Callable[[], bool] = lambda: False
        self.restored_nonce = self.carried_nonce = ""
        self.status_read_at = 0.0  # when _forgotten last read the coordinator's status
        self.refused_heal = 0  # the round of the last heal order whose payload failed its MAC
        self.device: dist.ProcessGroupGloo.Device | None = None  # gloo's, for every group
        self.heartbeat = Heartbeat(cfg, self.island, self.token)
        self.link_rate = LinkRate()  # of the last exchange: deadlines follow it if it is slow

    @property
    def outer(self) -> OuterState | None:
        """The outer state of this rank's first shard (of the whole model when the fleet state
        is not cut: fleet.shards = 1); None on a rank that holds no shard."""
        return self.shards.outer[self.shards.mine[0]] if self.shards.mine else None

    @property
    def feedback(self):
        return self.shards.feedback[self.shards.mine[0]] if self.shards.mine else None

    def digest(self) -> str:
        """The island's digest of its global parameters: of every shard, on every rank."""
        held: dict[int, str] = {}
        for result in self.crew.run("digests"):
            held |= {int(k): d for k, d in result["digests"].items()}
        return island_digest([held[k] for k in range(self.shards.count)])

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
        """Take part in the next round until it commits, then take its result into the model
        (an island of one rank; fleet/island.py runs the steps for several)."""
        self.prepare(model)
        outcome = self.exchange(tokens, data)
        self.take(model, outcome)
        return outcome

    def fragment(self, number: int) -> int | None:
        """What round `number` synchronises (fleet/streaming.py)."""
        return fragment_of(number, self.cfg.fragments, self.total_rounds, self.warm_rounds)

    def prepare(self, model: nn.Module) -> None:
        """Every rank: keep its shards' pseudo-gradients of the next round's fragment (a
        collective on a sharded model)."""
        self.shards.prepare(model, self.fragment(self.round_have + 1))

    def exchange(self, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        """Take part in the next round until it commits (retrying attempts as members fail).
        Touches no model, so it can run while the island trains on (fleet.overlap).

        If the coordinator goes away, reconnect, say where this island stands, and go on.
        """
        while True:
            try:
                return self._sync_once(tokens, data)
            except (dist.DistNetworkError, dist.DistStoreError) as exc:
                log.warning("fleet: lost the coordinator (%s); reconnecting", str(exc)[:120])
                self.crew.run("abort")
                self._connect()
                self._knock(reconnect=True)
                if self.role != "member":
                    return self._rejoin()

    def take(self, model: nn.Module, outcome: RoundOutcome, mix: float = 0.0) -> None:
        """The model takes the round's global parameters: the fragment it synchronised, merged
        as local = mix * local + (1 - mix) * global; or all of them after a heal. Every rank of
        the island calls (each slice comes from the rank that owns it)."""
        if outcome.reload == "fragment":
            self.shards.write(model, outcome.fragment, mix)
        elif outcome.reload == "all":
            self.shards.write(model, None)

    def _sync_once(self, tokens: int, data: dict[str, Any]) -> RoundOutcome:
        self.heartbeat.status["state"] = "syncing"
        self.heal_sent()  # a heal served mid-round uses the gloo device too: let it finish
        number = self.round_have + 1
        ready = {"tokens": tokens, "data": data, "nonce": self.nonce}
        # what the coordinator's exchange deadline allows for (fleet/deadlines.py): the largest
        # shard's, which its owners send on a connection of their own
        ready |= {"bytes": self._largest_payload(number)}
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
                return self._rejoin()
            without_us = record and self.island not in record["members"]
            if (without_us and record.get("decision") == "commit") or self._forgotten(
                record, number
            ):
                log.warning("fleet: round %d committed without this island", number)
                self._knock(reconnect=True)
                return self._rejoin()
            if record and record["attempt"] > tried and self.island in record["members"]:
                if record.get("decision") is None:
                    waiting_s = time.perf_counter() - waited
                    outcome = self._attempt(tokens, number, record)
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

    def _attempt(self, tokens: int, number: int, record) -> RoundOutcome | None:
        attempt, members = record["attempt"], record["members"]
        started = time.perf_counter()
        result = {"ok": False, "digest": None, "bytes_sent": 0, "tokens": tokens}
        args = {"number": number, "attempt": attempt, "members": members, "tokens": tokens}
        try:
            opened = self.crew.run("open", **args)  # every rank, its own shards (shard_ops.py)
        except RuntimeError as exc:  # a peer died or stalled: report, then retry with survivors
            log.warning("fleet: round %d attempt %d failed: %s", number, attempt, str(exc)[:200])
            opened = None
        if opened is not None:
            result = self._step_on(opened, members, number)
            result.update(bytes_sent=sum(r["bytes_sent"] for r in opened), tokens=tokens)
        exchange_s = time.perf_counter() - started
        self.keys.put(
            f"result/{number}/{attempt}/{self.island}", {**result, "exchange_s": exchange_s}
        )
        self.heartbeat.news()
        decision = self._wait_for(lambda: self._decision(number, attempt), "decision", 3600.0)
        if decision.get("decision") != "commit":
            self.crew.run("abort")
            time.sleep(min(1.0, 0.05 * (attempt + 1)))  # back off before the retry
            return None
        if self.island not in decision["members"]:
            return self._quarantined(decision, number)
        # a round whose work of this island was left out does not carry its error on
        self.crew.run(
            "commit", keep_error=self.island not in result["excluded"] + result["refused"]
        )
        self.fresh = False
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
            fragment=self.fragment(number),
            reload="fragment",
        )

    def _step_on(self, opened: list[dict[str, Any]], members: list[str], number: int):
        """The tentative outer step of round `number`, on every rank's shards, with the
        payloads whose MAC holds (`opened`: each rank's report of its shards). A payload that
        fails it was changed on its way: its sender is refused (left out, reported as its
        fault). A pseudo-gradient whose norm (over all shards) is an outlier is left out."""
        use, excluded, refused = keep(opened, members, self.guards.outlier_ratio)
        if refused:
            log.warning("fleet: round %d: refused the payload of %s (bad MAC)", number, refused)
        held: dict[int, str] = {}
        for result in self.crew.run("step", number=number, use=use):
            held |= {int(k): d for k, d in result["digests"].items()}
        shard_digests = [held[k] for k in range(self.shards.count)]
        digest = island_digest(shard_digests)
        result = {"ok": True, "digest": digest, "excluded": excluded, "refused": refused}
        return result | ({"shard_digests": shard_digests} if len(shard_digests) > 1 else {})

    def _largest_payload(self, number: int) -> int:
        """Bytes the busiest rank of this island sends in round `number` (its shards, one
        after the other): what the coordinator's exchange deadline allows for."""
        fragment, kind, shards = self.fragment(number), self.compression(number), self.shards
        per_rank = [0] * shards.ranks
        for k in range(shards.count):
            size = shards.fragment_size(k, fragment)
            if size:
                per_rank[k % shards.ranks] += message_bytes(size, kind, self.cfg.block)
        return max(per_rank)

    def _decision(self, number: int, attempt: int) -> dict[str, Any] | None:
        record = self.keys.get(f"round/{number}")
        if record is None or record["attempt"] < attempt:
            return None
        if record["attempt"] > attempt:
            return {"decision": "abort"}
        return record if record.get("decision") else None

    def _quarantined(self, decision: dict[str, Any], number: int) -> RoundOutcome:
        """The fleet committed the round without this island: its global state disagreed with
        the majority's (silent corruption). Drop this round's work and take a donor's state."""
        log.warning("fleet: quarantined in round %d; healing from a donor", number)
        self.crew.run("abort")
        self.crew.run("reset")  # the residual may hold the corruption too
        final = self._heal() or decision.get("final", False)
        return RoundOutcome(committed=False, final=final, round=number)

    def _rejoin(self) -> RoundOutcome:
        """This island is behind the fleet: keep its work for its next round, get healed."""
        number = self.round_have + 1
        if not self.warm(number):  # a warm-start step missed is lost: the heal brings the average
            self.crew.run("carry", number=number)
        if self.role == "finished":
            return RoundOutcome(committed=False, final=True, round=self.round_have, reload="")
        final = self._heal()  # healed at the last round: the run is over for this island too
        return RoundOutcome(committed=False, final=final, round=self.round_have)

    def close(self) -> None:
        self.heal_sent()
        self.heartbeat.status["state"] = "done"
        self.heartbeat.stop()
