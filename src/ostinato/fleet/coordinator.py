"""The fleet coordinator: who is alive, who takes part in each round, and whether it commits.

It hosts the TCPStore and runs one loop over it: read join requests (knocks), read heartbeats,
advance the round. It holds no model state: after a restart it learns the last committed round
from the islands, which re-knock when their connection drops, so a restart loses no round.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ostinato.config import FleetConfig, GuardsConfig
from ostinato.fleet import wire
from ostinato.fleet.guards import GuardLog, fleet_digest, outliers_above_median
from ostinato.fleet.streaming import fragment_of

log = logging.getLogger("ostinato")
TICK_S = 0.01  # rounds: readiness and results are polled this often
SLOW_TICK_S = 0.1  # knocks, heartbeats, health and status: none needs a faster answer
COMPARED = (
    "model",
    "tokenizer",
    "compression",
    "block",
    "outer_lr",
    "outer_momentum",
    "fragments",
    "rounds",
)


@dataclass
class IslandView:
    name: str
    nonce: str
    role: str  # member: holds the current global state; joiner: waits for a donor
    have: int  # the last committed round whose global state the island holds
    last_beat: float
    beat: int = -1
    status: dict[str, Any] = field(default_factory=dict)
    gone: bool = False  # reported gone by the heartbeat guard, until it beats again
    slow_beats: int = 0  # heartbeats in a row below the others' speed
    judged_beat: int = -1  # the last heartbeat the straggler guard looked at
    reported_slow: bool = False


@dataclass
class RoundState:
    number: int = 1
    attempt: int = 0
    phase: str = "collect"  # collect: waiting for ready islands; exchange: members at work
    members: list[str] = field(default_factory=list)
    first_ready_at: float | None = None
    exchange_started: float = 0.0


def _differences(name: str, ours: Any, theirs: Any) -> list[tuple[str, Any, Any]]:
    """(dotted field, fleet's value, island's value) for each field that differs, so that a
    refusal names `model.n_layers` rather than printing two whole config sections."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            found
            for key in sorted(set(ours) | set(theirs))
            for found in _differences(f"{name}.{key}", ours.get(key), theirs.get(key))
        ]
    return [] if ours == theirs else [(name, ours, theirs)]


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
        self.islands: dict[str, IslandView] = {}
        self.fingerprint: dict[str, Any] | None = recipe  # what islands must agree on
        self.total_rounds = int((recipe or {}).get("rounds", 0))
        self.round = RoundState()
        # Every store request of a tick costs the coordinator's core; on a box the islands
        # share, polling all of them every TICK_S took ~11% of a core.
        self.slow_tick_s, self.last_slow_tick = SLOW_TICK_S, float("-inf")
        self.published_at: tuple = ()  # the round's (number, attempt, phase, finished) shown
        self.last_committed = 0
        self.last_members: list[str] = []
        self.last_healed: list[str] = []  # healed by the last commit: current, not late
        self.restore_asked: set[tuple[str, str]] = set()  # (island, nonce) told to restore
        self.committed_here = 0  # rounds committed by this coordinator process
        self.started = time.monotonic()
        self.finished = False
        self._knock_offset = 0
        self._recall_committed_rounds()

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
            self.tick()
            time.sleep(TICK_S)
            if not (self.finished and not self._alive()):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        slow = now - self.last_slow_tick >= self.slow_tick_s
        if slow:
            self.last_slow_tick = now
            self._read_knocks()
            self._read_heartbeats()
            self._watch_health()
        if self._settled():
            if slow and not self.finished and self.round.phase == "collect":
                self._demote_late_islands()
            self._advance()
        where = (self.round.number, self.round.attempt, self.round.phase, self.finished)
        if slow or where != self.published_at:  # a round's progress is shown at once
            self.published_at = where
            self._publish_status()

    def _recall_committed_rounds(self) -> None:
        """A restarted coordinator continues from its own log of committed rounds."""
        path = self.out / "rounds.jsonl" if self.out else None
        if path is None or not path.exists():
            return
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            self.last_committed = records[-1]["round"]
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

    # --- membership -------------------------------------------------------------------------

    def _read_knocks(self) -> None:
        if not self.public.view.check([wire.KNOCK]):
            return
        raw = self.public.view.get(wire.KNOCK)  # bytes: anyone may append anything here
        complete = raw[: raw.rfind(b"\n") + 1]
        for line in complete[self._knock_offset :].split(b"\n"):
            if line.strip():
                self._answer(line.decode(errors="replace"))
        self._knock_offset = len(complete)

    def _answer(self, line: str) -> None:
        try:
            knock = json.loads(line)
            island, nonce = str(knock["island"]), str(knock["nonce"])
            reply = self._decide(island, nonce, knock)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("coordinator: ignoring a malformed join request %r", line[:200])
            return
        self.public.put(f"reply/{island}/{nonce}", reply)
        if reply["ok"]:
            log.info("coordinator: island %s joined as %s", island, reply["role"])
        else:
            log.warning("coordinator: refused island %s: %s", island, reply["reason"])

    def _decide(self, island: str, nonce: str, knock: dict[str, Any]) -> dict[str, Any]:
        if knock.get("mac") != wire.knock_mac(self.token, island, nonce):
            return {
                "ok": False,
                "reason": "wrong fleet token (--fleet.token or OSTINATO_FLEET_TOKEN)",
            }
        if not isinstance(knock.get("round_have", 0), int) or not isinstance(
            knock.get("fingerprint", {}), dict
        ):
            raise TypeError("round_have must be an integer and fingerprint an object")
        previous = self.islands.get(island)
        if previous and self._is_alive(previous) and not knock.get("reconnect"):
            return {"ok": False, "reason": f"an island named {island!r} is already in the fleet"}
        problem = self._mismatch(knock.get("fingerprint", {}))
        if problem:
            return {"ok": False, "reason": problem}
        if self.finished:
            return {"ok": False, "reason": "the fleet has finished its run", "finished": True}
        have = knock.get("round_have", 0)
        if have > self.last_committed and not self.committed_here:
            self._learn_last_committed(have)
        role = "member" if have == self.last_committed else "joiner"
        self.islands[island] = IslandView(island, nonce, role, have, time.monotonic())
        return {"ok": True, "role": role, "round": self.last_committed + 1}

    def _learn_last_committed(self, have: int) -> None:
        """After a restart (or a fleet resumed from its checkpoint) the islands say where it was."""
        self.last_committed = have
        self.round = RoundState(number=have + 1)
        for view in self.islands.values():
            view.role = "member" if view.have == have else "joiner"

    def _mismatch(self, fingerprint: dict[str, Any]) -> str | None:
        """What differs from the fleet's recipe: the coordinator's own (--config), or else the
        first island's; what the recipe cannot say (the tokenizer) comes from the first island."""
        if self.fingerprint is None:
            self.fingerprint = fingerprint
            self.total_rounds = int(fingerprint.get("rounds", 0))
            return None
        known = [k for k in COMPARED if k in self.fingerprint]
        differing = [k for k in known if fingerprint.get(k) != self.fingerprint.get(k)]
        if not differing:
            self.fingerprint.update({k: v for k, v in fingerprint.items() if k not in known})
            return None
        details = "; ".join(
            f"{name}: fleet {ours!r}, island {theirs!r}"
            for k in differing
            for name, ours, theirs in _differences(k, self.fingerprint.get(k), fingerprint.get(k))
        )
        return f"its config differs from the fleet's in {', '.join(differing)} ({details})"

    def _read_heartbeats(self) -> None:
        now = time.monotonic()
        for view in self.islands.values():
            beat = self.keys.get(f"hb/{view.name}")
            if beat and beat.get("n") != view.beat:
                view.beat, view.status, view.last_beat = beat["n"], beat, now

    def _watch_health(self) -> None:
        """Heartbeat guard (an island that went silent) and straggler guard (one that is slow)."""
        for view in self.islands.values():
            alive = self._is_alive(view)
            leaving = self.finished or view.status.get("state") == "done"
            if not alive and not view.gone and not leaving:
                silent = time.monotonic() - view.last_beat
                self.guard_log.fire(
                    "heartbeat",
                    view.name,
                    "dropped from rounds until it rejoins",
                    f"island {view.name} sent no heartbeat for {silent:.1f} s; counted as gone",
                    silent_s=silent,
                )
            view.gone = not alive
        self._watch_speeds()

    def _watch_speeds(self) -> None:
        ratio = self.guards.straggler_ratio
        training = {
            v.name: v
            for v in self.islands.values()
            if self._is_alive(v) and v.status.get("state") == "training"
        }
        slowness = {
            n: 1.0 / v.status["tokens_per_s"]
            for n, v in training.items()
            if v.status.get("tokens_per_s")
        }
        slow = outliers_above_median(slowness, ratio) if len(slowness) > 1 else {}
        for name, view in training.items():
            if view.beat == view.judged_beat:
                continue  # judge each heartbeat once
            view.judged_beat = view.beat
            view.slow_beats = view.slow_beats + 1 if name in slow else 0
            if view.slow_beats >= 3 and not view.reported_slow:
                view.reported_slow = True
                self.guard_log.fire(
                    "straggler",
                    name,
                    "reported",
                    f"island {name} trains {slow[name]:.1f}x slower than the others' median",
                    factor=slow[name],
                )
            elif view.slow_beats == 0:
                view.reported_slow = False

    def _is_alive(self, view: IslandView) -> bool:
        return time.monotonic() - view.last_beat < self.cfg.heartbeat_timeout_s

    def _alive(self, role: str | None = None) -> list[str]:
        return sorted(
            v.name for v in self.islands.values() if self._is_alive(v) and role in (None, v.role)
        )

    # --- rounds ------------------------------------------------------------------------------

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
        if not ready:
            state.first_ready_at = None
            return
        state.first_ready_at = state.first_ready_at or now
        grace_over = now - state.first_ready_at >= self.cfg.grace_s
        if ready == live or (grace_over and len(ready) >= self.cfg.min_islands):
            state.phase, state.members, state.exchange_started = "exchange", ready, now
            self.keys.put(f"round/{state.number}", {"attempt": state.attempt, "members": ready})

    def _restore_orphans(self) -> None:
        """No member of the last committed round is alive, so no joiner can be healed. Each
        live joiner is told to restore the fleet's latest durable state (the fleet checkpoint,
        else its own) and say which round that is of; the one holding the newest carries the
        fleet on as the state of the last committed round, and heals the others at the next
        commit. Rounds committed after that checkpoint are lost; round numbers go on."""
        reports = {}
        for name in self._alive("joiner"):
            nonce = self.islands[name].nonce
            report = self.keys.get(f"restored/{name}/{nonce}")
            if report is not None:
                reports[name] = int(report.get("from_round", 0))
            elif (name, nonce) not in self.restore_asked and self.last_committed > 0:
                self.keys.put(f"restore/{name}/{nonce}", {"round": self.last_committed})
                self.restore_asked.add((name, nonce))
        if not reports:
            return
        chosen = max(reports, key=lambda n: (reports[n], n))
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
            late = self._ready(self.last_committed, view.name)
            current = view.name in self.last_members or view.name in self.last_healed
            if view.role == "member" and late and not current:
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
            keep = self._digest_guard(results)
            if len(keep) >= min(self.cfg.min_islands, len(results)) and keep:
                self._commit({m: results[m] for m in keep}, results)
            else:
                self._abort("the members' digests differ and too few agree")
            return
        gone = [m for m in state.members if m not in self._alive()]
        overdue = time.monotonic() - state.exchange_started > self.cfg.timeout_s + 5
        if gone or overdue:
            self._abort(f"gone: {', '.join(gone)}" if gone else "exchange overdue")

    def _digest_guard(self, results: dict[str, dict[str, Any]]) -> list[str]:
        """The members whose global digest is the fleet's; the others are quarantined."""
        suspects = sorted({m for r in results.values() for m in r.get("excluded", [])})
        for name in suspects:
            self.guard_log.fire(
                "pseudo_gradient",
                name,
                "left out of the average",
                f"round {self.round.number}: island {name}'s pseudo-gradient norm is an outlier",
                round=self.round.number,
            )
        digests = {m: r["digest"] for m, r in results.items()}
        if len(set(digests.values())) == 1 or not self.guards.fleet_digest:
            return list(results)  # without the guard a disagreement goes unnoticed
        order = [*self.last_members, *sorted(results)]
        kept = fleet_digest(digests, order, suspects)
        for name, digest in digests.items():
            if digest != kept:
                self.guard_log.fire(
                    "digest",
                    name,
                    "quarantined and healed from a donor",
                    f"round {self.round.number}: island {name}'s global digest {digest} is not "
                    f"the fleet's {kept}",
                    round=self.round.number,
                )
        return [m for m in self.round.members if digests[m] == kept]

    def _commit(
        self, results: dict[str, dict[str, Any]], all_results: dict[str, dict[str, Any]]
    ) -> None:
        state = self.round
        quarantined = [m for m in state.members if m not in results]
        state.members = [m for m in state.members if m in results]
        donor = state.members[0]
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
                {"island": j, "donor": donor, "nonce": self.islands[j].nonce} for j in joiners
            ],
            "final": final,
            "checkpoint_by": donor if write_checkpoint else None,
            "data": data,
        }
        self.keys.put(f"round/{state.number}", record)
        self._log_round(all_results, quarantined)
        self._link_guard(all_results)
        for joiner in joiners:
            self.islands[joiner].role = "member"
        for view in self.islands.values():
            if view.role == "member":
                view.have = state.number
        self.last_members = list(state.members)
        self.last_healed = list(joiners)
        self.last_committed = state.number
        self.committed_here += 1
        self.round = RoundState(number=state.number + 1)
        self.finished = final

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

    def _link_guard(self, results: dict[str, dict[str, Any]]) -> None:
        exchange = {m: r["exchange_s"] for m, r in results.items()}
        for name, times in outliers_above_median(exchange, self.guards.link_ratio, 0.5).items():
            self.guard_log.fire(
                "link",
                name,
                "reported",
                f"round {self.round.number}: island {name}'s exchange took "
                f"{exchange[name]:.2f} s, {times:.1f}x the others' median",
                round=self.round.number,
                factor=times,
            )

    def _log_round(self, results: dict[str, dict[str, Any]], quarantined: list[str]) -> None:
        state = self.round
        kept = state.members[0]
        fragments = int((self.fingerprint or {}).get("fragments", 1))
        record = {
            "round": state.number,
            "fragment": fragment_of(state.number, fragments, self.total_rounds),  # None: all
            "attempt": state.attempt,
            "members": state.members,
            "bytes_sent": {m: r["bytes_sent"] for m, r in results.items()},
            "exchange_s": max(r["exchange_s"] for r in results.values()),
            "tokens": {m: r["tokens"] for m, r in results.items()},
            "digest": results[kept]["digest"],
            "excluded": sorted({m for r in results.values() for m in r.get("excluded", [])}),
            "quarantined": quarantined,
            "time": time.time(),
        }
        log.info("coordinator: round %d committed by %s", state.number, ", ".join(state.members))
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / "rounds.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _publish_status(self) -> None:
        islands = [
            {
                "island": v.name,
                "state": v.status.get("state", "starting") if self._is_alive(v) else "gone",
                "role": v.role,
                "step": v.status.get("step"),
                "tokens_per_s": v.status.get("tokens_per_s"),
                "round": v.status.get("round"),
            }
            for v in sorted(self.islands.values(), key=lambda v: v.name)
        ]
        status = {
            "round": self.round.number,
            "attempt": self.round.attempt,
            "phase": self.round.phase,
            "last_committed": self.last_committed,
            "total_rounds": self.total_rounds,
            "finished": self.finished,
            "islands": islands,
        }
        self.keys.put("status", status)
