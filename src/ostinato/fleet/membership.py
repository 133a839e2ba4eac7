"""Who is in the fleet: joining, heartbeats and the health guards, on the coordinator's side.

Joining is a challenge-response under the fleet token. An island appends a knock to the public
log ({"island", "nonce"}); the coordinator answers with a fresh challenge at
`challenge/ISLAND/NONCE`; the island appends its answer (its fingerprint and round, the challenge,
and a MAC over all of it, wire.join_mac). A challenge is spent by its first answer, right or
wrong, so a recorded answer replayed later, or a guessed MAC, gets nowhere. The public log is
compacted after each read, so it holds only the knocks not yet read.

Health: the heartbeat guard (an island gone silent), the progress guard (an island that beats
but whose inner step stopped advancing: a stall) and the straggler guard (one that is slow).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ostinato.config import FleetConfig, GuardsConfig
from ostinato.fleet import wire
from ostinato.fleet.guards import GuardLog, outliers_above_median

log = logging.getLogger("ostinato")
COMPARED = (
    "model",
    "tokenizer",
    "compression",
    "block",
    "outer_lr",
    "outer_momentum",
    "fragments",
    "warm_start_steps",
    "shards",
    "rounds",
    "warm_start",
)
MAX_KNOCK_BYTES = 1 << 20  # a log this long unread is a flood: it is cut, knocks in it retried
MAX_CHALLENGES = 1024  # pending challenges kept; the oldest is dropped beyond that
Admit = Callable[[str, str, dict[str, Any]], dict[str, Any]]  # (island, nonce, answer) -> reply


@dataclass
class IslandView:
    name: str
    nonce: str
    role: str  # member: holds the current global state; joiner: waits for a donor
    have: int  # the last committed round whose global state the island holds
    last_beat: float
    beat: int = -1
    status: dict[str, Any] = field(default_factory=dict)
    gone: bool = False  # reported gone by the heartbeat or progress guard, until it is back
    closed: bool = False  # its liveness connection ended without a "bye": the process died
    fresh: bool = False  # healed mid-round (fleet/prompt_heal.py), until a round it is in commits
    slow_beats: int = 0  # heartbeats in a row below the others' speed
    judged_beat: int = -1  # the last heartbeat the straggler guard looked at
    reported_slow: bool = False
    step: Any = None  # the inner step its heartbeats last carried
    progress_at: float = field(default_factory=time.monotonic)  # when that step was new
    stalled: bool = False  # beats, but no new step for fleet.progress_timeout_s
    bad_donors: set[str] = field(default_factory=set)  # donors whose heal failed its MAC


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


class Membership:
    def __init__(
        self,
        cfg: FleetConfig,
        guards: GuardsConfig,
        guard_log: GuardLog,
        token: str,
        keys: wire.Keys,
        public: wire.Keys,
        recipe: dict[str, Any] | None,
    ):
        self.cfg, self.guards, self.guard_log, self.token = cfg, guards, guard_log, token
        self.keys, self.public = keys, public
        self.islands: dict[str, IslandView] = {}
        self.fingerprint: dict[str, Any] | None = recipe  # what islands must agree on
        self.total_rounds = int((recipe or {}).get("rounds", 0))
        self.challenges: dict[tuple[str, str], tuple[str, float]] = {}  # -> (challenge, issued)
        self._knock_offset = 0
        # When the heartbeat guard last looked: silence counts up to then, so an island stops
        # counting as alive only when the guard has reported it, never between two looks.
        self.judged_at = float("-inf")

    # --- joining ----------------------------------------------------------------------------

    def read_knocks(self, admit: Admit) -> None:
        """Answer the knocks appended since the last read; `admit` decides on an island whose
        answer and recipe are right (what role it gets, or that the run is over)."""
        self._expire_challenges()
        if not self.public.has(wire.KNOCK):
            return
        raw = self.public.view.get(wire.KNOCK)  # bytes: anyone may append anything here
        complete = raw[: raw.rfind(b"\n") + 1]
        for line in complete[self._knock_offset :].split(b"\n"):
            if line.strip():
                self._answer(line.decode(errors="replace"), admit)
        self._knock_offset = len(complete)
        self._compact(raw)

    def _compact(self, raw: bytes) -> None:
        """Drop what was read, in one compare-and-swap: an append that lands between the read
        and the swap makes it fail, and the next read tries again. Past MAX_KNOCK_BYTES (only a
        flood gets there) the log is cut whatever it holds; islands in it knock again."""
        rest = raw[self._knock_offset :]
        rest = b"" if len(rest) > MAX_KNOCK_BYTES else rest  # unterminated junk
        now = self.public.view.compare_set(wire.KNOCK, raw, rest)
        if now == rest:
            self._knock_offset = 0
        elif len(now) > MAX_KNOCK_BYTES or not now.startswith(raw):
            self.public.view.set(wire.KNOCK, b"")  # flooded, or rewritten by a stranger
            self._knock_offset = 0

    def _answer(self, line: str, admit: Admit) -> None:
        try:
            knock = json.loads(line)
            island, nonce = str(knock["island"]), str(knock["nonce"])
            if "challenge" not in knock:
                self._challenge(island, nonce)
                return
            reply = self._decide(island, nonce, knock, admit)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("coordinator: ignoring a malformed join request %r", line[:200])
            return
        where = f"reply/{island}/{nonce}"
        if reply.get("retry") and self.public.has(where):
            return  # a replay of an answered knock must not overwrite its reply
        self.public.put(where, reply)
        if reply["ok"]:
            log.info("coordinator: island %s joined as %s", island, reply["role"])
        else:
            log.warning("coordinator: refused island %s: %s", island, reply["reason"])

    def _challenge(self, island: str, nonce: str) -> None:
        if (island, nonce) in self.challenges:
            return  # the same knock read twice (the log was rewritten): one challenge
        while len(self.challenges) >= MAX_CHALLENGES:
            self._drop_challenge(next(iter(self.challenges)))
        challenge = secrets.token_hex(16)
        self.challenges[(island, nonce)] = (challenge, time.monotonic())
        self.public.put(f"challenge/{island}/{nonce}", {"challenge": challenge})

    def _drop_challenge(self, pending: tuple[str, str]) -> str | None:
        issued = self.challenges.pop(pending, None)
        self.public.delete(f"challenge/{pending[0]}/{pending[1]}")
        return issued[0] if issued else None

    def _expire_challenges(self) -> None:
        now = time.monotonic()
        for pending, (_, issued) in list(self.challenges.items()):
            if now - issued > self.cfg.connect_timeout_s:
                self._drop_challenge(pending)

    def _decide(
        self, island: str, nonce: str, knock: dict[str, Any], admit: Admit
    ) -> dict[str, Any]:
        issued = self._drop_challenge((island, nonce))  # spent by this answer, right or wrong
        if issued is None or not hmac.compare_digest(
            str(knock["challenge"]).encode(), issued.encode()
        ):
            reason = "unknown or spent challenge (a replayed join, or the coordinator restarted)"
            return {"ok": False, "reason": reason, "retry": True}
        expected = wire.join_mac(self.token, knock).encode()
        if not hmac.compare_digest(str(knock.get("mac", "")).encode(), expected):
            return {
                "ok": False,
                "reason": "wrong fleet token (--fleet.token or OSTINATO_FLEET_TOKEN)",
            }
        if not isinstance(knock.get("round_have", 0), int) or not isinstance(
            knock.get("fingerprint", {}), dict
        ):
            raise TypeError("round_have must be an integer and fingerprint an object")
        previous = self.islands.get(island)
        if previous and self.is_alive(previous) and not knock.get("reconnect"):
            return {"ok": False, "reason": f"an island named {island!r} is already in the fleet"}
        problem = self._mismatch(knock.get("fingerprint", {}))
        if problem:
            return {"ok": False, "reason": problem}
        return admit(island, nonce, knock)

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

    # --- health -----------------------------------------------------------------------------

    def read_heartbeats(self) -> None:
        now = time.monotonic()
        for view in self.islands.values():
            beat = self.keys.get(f"hb/{view.name}")
            if beat and beat.get("n") != view.beat:
                view.beat, view.status, view.last_beat = beat["n"], beat, now
                step = beat.get("step")
                if beat.get("state") != "training" or step != view.step:
                    # only time spent training without a new step counts towards a stall
                    view.step, view.progress_at, view.stalled = step, now, False

    def watch_health(self, finished: bool) -> None:
        """Heartbeat guard (an island that went silent), progress guard (one that beats but
        makes no step) and straggler guard (one that is slow)."""
        self.judged_at = time.monotonic()
        for view in self.islands.values():
            leaving = finished or view.status.get("state") == "done"
            if not leaving:
                self._watch_progress(view)
            if not self.beating(view) and not view.gone and not leaving:
                silent = self.judged_at - view.last_beat
                self.guard_log.fire(
                    "heartbeat",
                    view.name,
                    "dropped from rounds until it rejoins",
                    f"island {view.name} sent no heartbeat for {silent:.1f} s; counted as gone",
                    silent_s=silent,
                )
            view.gone = not self.is_alive(view)
        self._watch_speeds()

    def connection_lost(self, island: str, nonce: str, finished: bool) -> None:
        """The liveness connection of this admission of `island` ended without a "bye": its
        process is gone (the kernel closed its sockets). Counted now, not after the timeout."""
        view = self.islands.get(island)
        if view is None or view.nonce != nonce or view.closed:
            return
        view.closed = True
        if view.gone or finished or view.status.get("state") == "done":
            return
        view.gone = True
        silent = time.monotonic() - view.last_beat
        self.guard_log.fire(
            "heartbeat",
            view.name,
            "dropped from rounds until it rejoins",
            f"island {view.name}'s heartbeat connection closed ({silent:.1f} s after its last "
            f"beat): its process is gone",
            silent_s=silent,
            transport=True,
        )

    def _watch_progress(self, view: IslandView) -> None:
        silent = time.monotonic() - view.progress_at
        training = view.status.get("state") == "training"
        if training and self.beating(view) and not view.stalled:
            if silent >= self.cfg.progress_timeout_s:
                view.stalled = True
                self.guard_log.fire(
                    "progress",
                    view.name,
                    "dropped from rounds until it rejoins",
                    f"island {view.name} beats but finished no inner step for {silent:.1f} s "
                    f"(still at step {view.step}); counted as gone",
                    silent_s=silent,
                    step=view.step,
                )

    def read_heal_failures(self) -> None:
        """A joiner whose heal failed its MAC (changed in transit) reports the donor: a fault of
        that donor; the joiner is healed again at the next commit, by another donor if any."""
        for view in self.islands.values():
            report = self.keys.get(f"healbad/{view.name}/{view.nonce}")
            if report is None:
                continue
            self.keys.delete(f"healbad/{view.name}/{view.nonce}")
            donor = str(report.get("donor"))
            self.guard_log.fire(
                "mac",
                donor,
                "heal refused; the joiner is healed again by another donor",
                f"round {report.get('round')}: the heal island {donor} sent to island "
                f"{view.name} failed its MAC (changed in transit)",
                round=report.get("round"),
                receiver=view.name,
            )
            view.bad_donors.add(donor)
            view.role = "joiner"

    # --- rounds ------------------------------------------------------------------------------

    def _watch_speeds(self) -> None:
        ratio = self.guards.straggler_ratio
        training = {
            v.name: v
            for v in self.islands.values()
            if self.is_alive(v) and v.status.get("state") == "training"
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

    def rows(self) -> list[dict[str, Any]]:
        """Each island as the fleet's status shows it (`ostinato fleet status`)."""
        return [
            {
                "island": v.name,
                "state": self._shown_state(v),
                "role": v.role,
                "step": v.status.get("step"),
                "tokens_per_s": v.status.get("tokens_per_s"),
                "round": v.status.get("round"),
            }
            for v in sorted(self.islands.values(), key=lambda v: v.name)
        ]

    def _shown_state(self, view: IslandView) -> str:
        if self.is_alive(view):
            return view.status.get("state", "starting")
        return "stalled" if self.beating(view) else "gone"

    def beating(self, view: IslandView) -> bool:
        """Not closed, and not silent for the heartbeat timeout when the guard last looked."""
        silent = self.judged_at - view.last_beat
        return not view.closed and silent < self.cfg.heartbeat_timeout_s

    def is_alive(self, view: IslandView) -> bool:
        """Beating and making progress: an island that may take part in rounds."""
        return self.beating(view) and not view.stalled

    def alive(self, role: str | None = None) -> list[str]:
        return sorted(
            v.name for v in self.islands.values() if self.is_alive(v) and role in (None, v.role)
        )


Wait = Callable[[Callable[[], Any], str], Any]  # (probe, what) -> the probe's first non-None


def knock(
    public: wire.Keys, token: str, island: str, answer: dict[str, Any], wait: Wait
) -> tuple[str, dict[str, Any]]:
    """The island's side of joining: knock, answer the coordinator's challenge with `answer`
    (fingerprint, round_have, reconnect) under the token's MAC; returns (nonce, reply)."""
    nonce = secrets.token_hex(8)
    # A leading newline ends whatever junk a stranger may have appended before us.
    public.view.append(wire.KNOCK, "\n" + json.dumps({"island": island, "nonce": nonce}) + "\n")
    issued = wait(lambda: public.get(f"challenge/{island}/{nonce}"), "challenge")
    signed = {**answer, "island": island, "nonce": nonce, "challenge": issued["challenge"]}
    signed["mac"] = wire.join_mac(token, signed)
    public.view.append(wire.KNOCK, "\n" + json.dumps(signed) + "\n")
    reply = wait(lambda: public.get(f"reply/{island}/{nonce}"), "reply")
    public.delete(f"reply/{island}/{nonce}")
    return nonce, reply
