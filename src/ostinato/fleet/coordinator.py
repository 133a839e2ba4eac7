"""The fleet coordinator: who is alive, who takes part in each round, and whether it commits.

It hosts the TCPStore and runs one loop over it: read join requests (knocks), read heartbeats,
advance the round. Beside the store it listens for the islands' liveness connections
(fleet/liveness.py): a connection that ends without a "bye" is an island that died, known within
a tick, and an exchange it was in is aborted at once so the survivors retry without it. Membership (joining, heartbeats, health guards) is fleet/membership.py; this
module plans, commits and aborts rounds. It holds no model state: after a restart it learns the
last committed round from the islands, which re-knock when their connection drops, so a restart
loses no round. The keys of a round are deleted two rounds after it commits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ostinato.config import FleetConfig, GuardsConfig
from ostinato.fleet import wire
from ostinato.fleet.deadlines import bounded, exchange_overdue_s
from ostinato.fleet.guards import GuardLog
from ostinato.fleet.joining import heal_group
from ostinato.fleet.liveness import KEY as LIVENESS_KEY
from ostinato.fleet.liveness import LivenessServer
from ostinato.fleet.membership import IslandView, Membership
from ostinato.fleet.outer import outer_lr_of
from ostinato.fleet.prompt_heal import PromptHeals
from ostinato.fleet.round_guards import RoundGuards, round_record
from ostinato.fleet.shard_ops import exchange_group, heal_shard_group
from ostinato.fleet.streaming import fragment_of
from ostinato.jsonl import append_jsonl, read_jsonl

log = logging.getLogger("ostinato")
TICK_S = 0.01  # the shortest wait between two ticks (news, deaths and a moving round wake it)
SLOW_TICK_S = 0.1  # knocks, heartbeats, health and status: none needs a faster answer
KEPT_ROUNDS = 2  # committed rounds whose keys stay: a member may still be reading the last one


@dataclass
class RoundState:
    number: int = 1
    attempt: int = 0
    phase: str = "collect"  # collect: waiting for ready islands; exchange: members at work
    members: list[str] = field(default_factory=list)
    first_ready_at: float | None = None
    exchange_started: float = 0.0
    overdue_s: float = 0.0  # when the exchange counts as overdue (fleet/deadlines.py)
    tried: list[tuple[int, list[str]]] = field(default_factory=list)  # (attempt, members)
    disagreed: int = 0  # attempts aborted because too few members' digests agreed


class Coordinator:
    def __init__(
        self,
        bind: str,
        cfg: FleetConfig,
        out: Path | None = None,
        guards: GuardsConfig | None = None,
        recipe: dict[str, Any] | None = None,
    ):
        self.cfg, self.out = cfg, out
        self.guards = guards or GuardsConfig()
        self.guard_log = GuardLog(out)
        self.token = wire.fleet_token(cfg.token)
        self.store = wire.serve_store(bind)
        self.keys = wire.Keys(self.store, wire.namespace(self.token))
        self.public = wire.Keys(self.store, "public")
        self.membership = Membership(
            cfg, self.guards, self.guard_log, self.token, self.keys, self.public, recipe
        )
        self.islands = self.membership.islands
        self.prompt_heals = PromptHeals(self.keys, self.islands)
        self.liveness = LivenessServer(wire.split_address(bind)[0], self.token)
        self.keys.put(LIVENESS_KEY, {"port": self.liveness.port})
        self.round = RoundState()
        self.advanced_at: tuple = ()  # the round's (number, attempt, phase, finished) last advanced
        self.writes_announced = 0
        # Every store request of a tick costs the coordinator's core; on a box the islands
        # share, polling all of them every TICK_S took ~11% of a core.
        self.slow_tick_s, self.last_slow_tick = SLOW_TICK_S, float("-inf")
        self.published_at: tuple = ()  # the round's (number, attempt, phase, finished) shown
        self.last_committed = 0
        # the digest of the last committed round's global parameters (None: not known, after a
        # restart without a log): the state a restarted island says it holds must be this one
        # (a carried-on restore relabels an older state as the last round)
        self.last_digest: str | None = None
        self.last_members: list[str] = []
        self.last_healed: list[str] = []  # healed by the last commit: current, not late
        self.restore_asked: set[tuple[str, str]] = set()  # (island, nonce) told to restore
        self.committed_here = 0  # rounds committed by this coordinator process
        # keys to delete: a committed round's attempts, and the (joiner, nonce) it healed
        self.finished_rounds: dict[int, tuple[RoundState, list[tuple[str, str]]]] = {}
        self.started = time.monotonic()
        self.finished = False
        self._recall_committed_rounds()

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.membership.fingerprint

    @property
    def total_rounds(self) -> int:
        return self.membership.total_rounds

    @property
    def port(self) -> int:
        return self.store.port

    def run(self) -> None:
        """Serve until the final round is committed and every island has left.

        It lingers a while after that, so an island that restarts late is told the run is over
        instead of finding nobody there.
        """
        quiet_since = None
        while quiet_since is None or time.monotonic() - quiet_since < self.cfg.connect_timeout_s:
            ticked = time.monotonic()
            self.tick()
            self._wait(ticked)
            if not (self.finished and not self._alive()):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()

    def _wait(self, ticked: float) -> None:
        """Sleep until a liveness connection speaks (news, a death, a hello) or the next slow
        tick is due; a round that just moved is looked at again after TICK_S. Never more often
        than every TICK_S, however much an island says."""
        due = self.last_slow_tick + self.slow_tick_s - time.monotonic()
        self.liveness.wait(TICK_S if self._position != self.advanced_at else max(0.0, due))
        time.sleep(max(0.0, TICK_S - (time.monotonic() - ticked)))

    def close(self) -> None:
        """Stop listening (the store goes with the object)."""
        self.liveness.close()

    def tick(self) -> None:
        """On every wake-up (`_wait`): deaths, and the round if a member sent news; every
        SLOW_TICK_S: knocks, heartbeats, health, and the round's deadlines."""
        deaths = [event for event in self.liveness.poll() if event[2]]
        for island, nonce, _ in deaths:  # every tick: a death is news
            self.membership.connection_lost(island, nonce, self.finished)
        now = time.monotonic()
        slow = now - self.last_slow_tick >= self.slow_tick_s
        if slow:
            self.last_slow_tick = now
            self.membership.read_knocks(self._admit)
            self.membership.read_heartbeats()
            self.membership.watch_health(self.finished)
            self.membership.read_heal_failures()
            self.prompt_heals.confirm(lambda name: name in self._alive(), self.last_committed)
        news = self.liveness.take_news()
        where = self._position
        if self._settled() and (slow or news or deaths or where != self.advanced_at):
            if slow and not self.finished and self.round.phase == "collect":
                self._demote_late_islands()
            self._advance()
            self.advanced_at = where  # a round that moved is looked at again next tick
        if slow or self._position != self.published_at:  # a round's progress is shown at once
            self.published_at = self._position
            self._publish_status()
        self._announce_writes()

    @property
    def _position(self) -> tuple:
        """Where the round stands: (number, attempt, phase, finished)."""
        return (self.round.number, self.round.attempt, self.round.phase, self.finished)

    def _announce_writes(self) -> None:
        """Members waiting on the coordinator read one counter, not every key (wire.ORDERS)."""
        writes = self.keys.writes + self.public.writes
        if writes != self.writes_announced:
            self.keys.bump(wire.ORDERS)
            self.writes_announced = writes

    def _recall_committed_rounds(self) -> None:
        """A restarted coordinator continues from its own log of committed rounds."""
        path = self.out / "rounds.jsonl" if self.out else None
        if path is None or not path.exists():
            return
        records = read_jsonl(path)  # a record torn by a kill mid-write is skipped
        if records:
            self.last_committed = records[-1]["round"]
            self.last_digest = records[-1].get("digest")
            self.last_members = records[-1]["members"]
            self.round = RoundState(number=self.last_committed + 1)
            log.info("coordinator: continuing after round %d (from %s)", self.last_committed, path)

    def _settled(self) -> bool:
        """After a (re)start, islands get a moment to (re-)knock before rounds are planned."""
        waited = time.monotonic() - self.started
        if waited < min(self.cfg.heartbeat_timeout_s, 2.0):
            return False
        expected = self.committed_here == 0 and len(self.islands) < self.cfg.expect
        return not expected or waited > self.cfg.connect_timeout_s

    def _is_alive(self, view: IslandView) -> bool:
        return self.membership.is_alive(view)

    def _alive(self, role: str | None = None) -> list[str]:
        return self.membership.alive(role)

    def _admit(self, island: str, nonce: str, knock: dict[str, Any]) -> dict[str, Any]:
        """The role of an island whose answer and recipe are right, or that the run is over."""
        if self.finished:
            return {"ok": False, "reason": "the fleet has finished its run", "finished": True}
        have = knock.get("round_have", 0)
        if have > self.last_committed and not self.committed_here:
            self._learn_last_committed(have)
        same = self.last_digest is None or knock.get("digest") in (None, self.last_digest)
        role = "member" if have == self.last_committed and same else "joiner"
        previous = self.islands.get(island)
        if previous is not None:  # its orders went to a process that is gone
            old = f"{island}/{previous.nonce}"
            self.keys.delete(f"heal/{old}", f"restore/{old}", f"restored/{old}", f"healbad/{old}")
        self.islands[island] = IslandView(island, nonce, role, have, time.monotonic())
        if role == "joiner" and self.round.phase == "collect":
            self.prompt_heals.ask(self.islands[island], self._donors_now(), self.last_committed)
        return {
            "ok": True,
            "role": role,
            "round": self.last_committed + 1,
            "outer_lr": self.outer_lr,
        }

    @functools.cached_property
    def outer_lr(self) -> float:
        """The fleet's outer rate: the recipe's (the first island's without --config), "auto"
        resolved here once, at the first admission, from this coordinator's fleet.expect, so
        every island uses one."""
        configured = (self.fingerprint or {}).get("outer_lr", self.cfg.outer_lr)
        lr, why = outer_lr_of(dataclasses.replace(self.cfg, outer_lr=configured))
        log.info("coordinator: outer learning rate %g (%s)", lr, why)
        return lr

    def _donors_now(self) -> list[str]:
        """Members that can heal a joiner now: they hold the last committed round's state and
        are still training (not ready), so they reach an inner step before the next commit."""
        number = self.round.number
        return [
            m
            for m in self._alive("member")
            if self.islands[m].have == self.last_committed
            and not self.islands[m].fresh
            and not self._ready(number, m)
        ]

    def _learn_last_committed(self, have: int) -> None:
        """After a restart (or a fleet resumed from its checkpoint) the islands say where it was."""
        self.last_committed, self.last_digest = have, None
        self.round = RoundState(number=have + 1)
        for view in self.islands.values():
            view.role = "member" if view.have == have else "joiner"

    def _advance(self) -> None:
        if self.finished:
            return
        if self.round.phase == "collect":
            self._collect()
        else:
            self._watch_exchange()

    def _collect(self) -> None:
        state, now = self.round, time.monotonic()
        if not self._alive("member"):
            self._restore_orphans()
        live = self._alive("member")
        ready = [m for m in live if self._ready(state.number, m)]
        self.prompt_heals.hurry(state.number, live, ready)
        if not ready:
            state.first_ready_at = None
            return
        state.first_ready_at = state.first_ready_at or now
        grace_over = now - state.first_ready_at >= self.cfg.grace_s
        if ready == live or (grace_over and len(ready) >= self.cfg.min_islands):
            state.phase, state.members, state.exchange_started = "exchange", ready, now
            state.overdue_s = self._exchange_deadline(state.number, ready)
            state.tried.append((state.attempt, ready))
            self.keys.put(f"round/{state.number}", {"attempt": state.attempt, "members": ready})

    def _exchange_deadline(self, number: int, members: list[str]) -> float:
        """Seconds the members may take to exchange: their messages' size (each receives every
        other's) at the floor rate, or at the slowest rate a member last measured."""
        ready = [self.keys.get(f"ready/{number}/{m}") or {} for m in members]
        size = max(bounded(r.get("bytes")) for r in ready)
        rates = [rate for r in ready if (rate := bounded(r.get("rate"))) > 0]
        return exchange_overdue_s(self.cfg, size * (len(members) - 1), min(rates, default=0.0))

    def _restore_orphans(self) -> None:
        """No member of the last committed round is alive, so no joiner can be healed. Each
        live joiner is told to restore the fleet's latest durable state (the fleet checkpoint,
        else its own) and say which round that is of; the one holding the newest carries the
        fleet on as the state of the last committed round, and heals the others at the next
        commit. Rounds committed after that checkpoint are lost; round numbers go on."""
        reports, digests = {}, {}
        for name in self._alive("joiner"):
            nonce = self.islands[name].nonce
            report = self.keys.get(f"restored/{name}/{nonce}")
            if report is not None:
                reports[name] = int(report.get("from_round", 0))
                digests[name] = report.get("digest")
            elif (name, nonce) not in self.restore_asked and self.last_committed > 0:
                self.keys.put(f"restore/{name}/{nonce}", {"round": self.last_committed})
                self.restore_asked.add((name, nonce))
        if not reports:
            return
        chosen = max(reports, key=lambda n: (reports[n], n))
        self.last_digest = digests.get(chosen)
        view = self.islands[chosen]
        order = {"round": self.last_committed, "donor": chosen, "final": False}
        self.keys.put(f"heal/{chosen}/{view.nonce}", order)
        view.role, view.have = "member", self.last_committed
        self.last_members, self.last_healed = [chosen], []
        log.warning(
            "coordinator: no member of round %d is alive; island %s carries the fleet on from "
            "the state of round %d it restored",
            self.last_committed,
            chosen,
            reports[chosen],
        )

    def _ready(self, number: int, name: str) -> bool:
        """Whether the island's current process is ready for round `number`: a key left by a
        process that has since died and restarted (another nonce) does not count."""
        record = self.keys.get(f"ready/{number}/{name}")
        view = self.islands.get(name)
        return record is not None and view is not None and record.get("nonce") == view.nonce

    def _demote_late_islands(self) -> None:
        """A member ready for an already committed round missed it: it must be healed."""
        for view in self.islands.values():
            current = view.name in self.last_members or view.name in self.last_healed
            if (
                view.role == "member"
                and not current
                and self._ready(self.last_committed, view.name)
            ):
                view.role = "joiner"

    def _watch_exchange(self) -> None:
        state = self.round
        results = {
            m: self.keys.get(f"result/{state.number}/{state.attempt}/{m}") for m in state.members
        }
        if all(results.values()):
            if not all(r["ok"] for r in results.values()):
                self._abort("a member failed the exchange")
                return
            keep = RoundGuards(self.guards, self.guard_log, self.round).judge(
                results, self.last_members
            )
            enough = len(keep) >= min(self.cfg.min_islands, len(results))
            # A disagreement that outlasts a retry is in an island's held state, not in
            # transit: the round commits with the fleet's digest and heals the others, or a
            # fleet with min_islands = its islands would retry it for ever.
            if keep and (enough or state.disagreed > 0):
                self._commit({m: results[m] for m in keep}, results)
            else:
                state.disagreed += 1
                self._abort("the members' digests differ and too few agree")
            return
        gone = [m for m in state.members if m not in self._alive()]
        overdue = time.monotonic() - state.exchange_started > state.overdue_s
        if gone or overdue:
            self._abort(f"gone: {', '.join(gone)}" if gone else "exchange overdue")

    def _commit(
        self, results: dict[str, dict[str, Any]], all_results: dict[str, dict[str, Any]]
    ) -> None:
        state = self.round
        quarantined = [m for m in state.members if m not in results]
        state.members = [m for m in state.members if m in results]
        for name in quarantined:
            self.islands[name].role = "joiner"
        joiners = [name for name in self._alive("joiner")]
        final = self.total_rounds > 0 and state.number >= self.total_rounds
        every = self.cfg.checkpoint_every
        write_checkpoint = final or (every > 0 and state.number % every == 0)
        data = {
            m: self.keys.get(f"ready/{state.number}/{m}", {}).get("data") for m in state.members
        }
        record = {
            "attempt": state.attempt,
            "members": state.members,
            "decision": "commit",
            "heal": [
                {"island": j, "donor": self._donor_for(j), "nonce": self.islands[j].nonce}
                for j in joiners
            ],
            "final": final,
            "checkpoint_by": state.members[0] if write_checkpoint else None,
            "data": data,
        }
        self.keys.put(f"round/{state.number}", record)
        self._log_round(all_results, quarantined)
        RoundGuards(self.guards, self.guard_log, self.round).link(all_results)
        for joiner in joiners:
            self.islands[joiner].role = "member"
        for view in self.islands.values():
            if view.role == "member":
                view.have = state.number
        self.last_members = list(state.members)
        self.last_healed = list(joiners)
        self.last_committed = state.number
        self.last_digest = results[state.members[0]]["digest"]
        self.committed_here += 1
        healed = [(h["island"], h["nonce"]) for h in record["heal"]]
        self.finished_rounds[state.number] = (state, healed)
        self.prompt_heals.committed(state.number, state.members)
        self._forget_round(state.number - KEPT_ROUNDS)
        self.round = RoundState(number=state.number + 1)
        self.finished = final

    def _donor_for(self, joiner: str) -> str:
        """The first member of the round (the donor of the fleet checkpoint too), unless a heal
        from it failed its MAC at this joiner: then the first other member, if any."""
        members = self.round.members
        trusted = [m for m in members if m not in self.islands[joiner].bad_donors]
        return (trusted or members)[0]

    def _forget_round(self, number: int) -> None:
        """Delete the keys of a round committed KEPT_ROUNDS ago: its plan and decision, ready
        marks, results, and the rendezvous keys of its exchange and heal groups."""
        finished = self.finished_rounds.pop(number, None)
        if finished is None:
            return
        state, healed = finished
        keys = [f"round/{number}", *(f"ready/{number}/{name}" for name in self.islands)]
        shards = int((self.fingerprint or {}).get("shards", 1))
        for attempt, members in state.tried:
            keys += [f"result/{number}/{attempt}/{m}" for m in members]
            for k in range(shards):
                keys += wire.group_keys(exchange_group(number, attempt, k, shards), len(members))
        for joiner in healed:
            for k in range(shards):
                keys += wire.group_keys(heal_shard_group(heal_group(number, *joiner), k, shards), 2)
        self.keys.delete(*keys)

    def _abort(self, why: str) -> None:
        state = self.round
        log.warning(
            "coordinator: round %d attempt %d aborted (%s)", state.number, state.attempt, why
        )
        self.keys.put(
            f"round/{state.number}",
            {"attempt": state.attempt, "members": state.members, "decision": "abort"},
        )
        state.attempt += 1
        state.phase, state.first_ready_at = "collect", None

    def _log_round(self, results: dict[str, dict[str, Any]], quarantined: list[str]) -> None:
        state = self.round
        recipe = self.fingerprint or {}
        fragments, warm = int(recipe.get("fragments", 1)), int(recipe.get("warm_start_steps", 0))
        fragment = fragment_of(state.number, fragments, self.total_rounds, warm)  # None: all
        record = round_record(state.number, state.attempt, state.members, results, quarantined)
        record["warm"] = state.number <= warm  # a warm-start round: one step, fp32, averaged
        log.info("coordinator: round %d committed by %s", state.number, ", ".join(state.members))
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.out / "rounds.jsonl", {**record, "fragment": fragment})

    def _publish_status(self) -> None:
        status = {
            "round": self.round.number,
            "attempt": self.round.attempt,
            "phase": self.round.phase,
            "last_committed": self.last_committed,
            "total_rounds": self.total_rounds,
            "finished": self.finished,
            "islands": self.membership.rows(),
        }
        self.keys.put("status", status, announce=False)  # rewritten every slow tick
