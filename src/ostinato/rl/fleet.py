"""The trainer's side of rollout islands: it hosts the store, starts and supervises the islands,
publishes weights, hands out work and takes in rollouts (island side: ostinato.rl.island).

A batch of an update is cut into one slice per island (by the configured number of islands, so
which answers share an engine batch does not depend on who is alive). A slice whose island dies
(its process exits) or hangs (no result within rl.rollout_timeout_s) is lost: counted, handed to
another island, and the island is restarted; it joins again and loads the current weights
before its next work. While no island is admitted the trainer generates a slice itself, so the
run never waits on a crash loop. Results are checked like any input from elsewhere: the MAC,
then the shape and range of every field; a bad one is refused, counted, and generated again.
Rollouts older than rl.max_staleness versions never reach an update.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.fleet import wire
from ostinato.fleet.local import kill_session
from ostinato.model.llama import Llama
from ostinato.rl.config import RLConfig
from ostinato.rl.island import fingerprint
from ostinato.rl.rollout import generate
from ostinato.rl.weights import Publisher, flat_parameters, get_sealed, put_sealed, rl_prefix

log = logging.getLogger("ostinato")
POLL_S = 0.005
BEATS_READ_S = 0.25  # how often the trainer reads the islands' heartbeats
BEATS_PER_TIMEOUT = 5  # an island beats this many times per rl.heartbeat_timeout_s


@dataclass
class Slice:
    step: int
    lo: int  # answers [lo, hi) of the step's batch
    hi: int
    work: dict[str, Any]
    island: str | None = None
    key: str = ""  # the work key it was issued under
    issued_at: float = 0.0
    result: dict[str, Any] | None = None


@dataclass
class Island:
    name: str
    process: subprocess.Popen | None = None
    incarnation: str | None = None  # admitted process
    seen: set[str] = field(default_factory=set)  # incarnations that said hello
    issued: int = 0  # work items issued to this incarnation
    outstanding: list[Slice] = field(default_factory=list)
    beat: bytes = b""  # the last heartbeat read, and when (monotonic) it was new
    beat_at: float = 0.0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class FleetCounters:
    lost: int = 0  # answers in flight on an island that died or hung
    refused: int = 0  # answers whose result failed the MAC or the checks
    dropped_stale: int = 0
    local: int = 0  # answers the trainer generated itself (no island admitted)
    restarts: int = 0


class RolloutFleet:
    def __init__(
        self,
        rl: RLConfig,
        model: Llama,
        tokenizer: Tokenizer,
        out: Path,
        faults: dict[tuple[str, int], str] | None = None,
    ):
        self.rl, self.model, self.tokenizer, self.out = rl, model, tokenizer, out
        self.token = wire.fleet_token("") or secrets.token_hex(16)
        self.store = wire.serve_store(rl.bind)
        self.address = f"{wire.split_address(rl.bind)[0]}:{self.store.port}"
        self.view = torch.distributed.PrefixStore(rl_prefix(self.token), self.store)
        self.print = fingerprint(model.cfg, tokenizer)
        setup = {"model": self.print["model"], "tokenizer": tokenizer.to_str()}
        setup |= {"threads": rl.island_threads or rl.threads, "weight_push": rl.weight_push}
        setup |= {"heartbeat_s": rl.heartbeat_timeout_s / BEATS_PER_TIMEOUT}
        setup |= {"engine": rl.engine}
        self.publisher = Publisher(self.view, self.token, rl.weight_push)
        put_sealed(self.view, self.token, "setup", json.dumps(setup).encode(), "setup")
        self.islands = {f"r{i}": Island(f"r{i}") for i in range(rl.rollout_islands)}
        self.slices: dict[int, list[Slice]] = {}
        # islands measure their answers' log-probs when they may differ from the trainer's:
        # stale rollouts, or weights pushed as quantized deltas
        self.measures_behaviour = rl.max_staleness > 0 or rl.weight_push != "full"
        self.version = -1
        self.beats_read_at = 0.0
        self.counters = FleetCounters()
        # (island, update) -> "crash" | "hang": scripted faults, each struck once; and those
        # sent, with the guard that saw each
        self.faults = dict(faults or {})
        self.struck: list[dict[str, Any]] = []
        (out / "islands").mkdir(parents=True, exist_ok=True)
        if not rl.spawn:
            log.info("rl: waiting for rollout islands at %s (`ostinato rl rollout`)", self.address)
        for island in self.islands.values():
            self._start(island)

    # --- processes --------------------------------------------------------------------------

    def _start(self, island: Island) -> None:
        island.incarnation, island.issued = None, 0
        if not self.rl.spawn:
            return  # started by hand, elsewhere: it says hello again when it comes back
        command = [sys.executable, "-m", "ostinato", "rl", "rollout"]
        command += ["--coordinator", self.address, "--island", island.name]
        env = dict(os.environ, OSTINATO_FLEET_TOKEN=self.token, PYTHONUNBUFFERED="1")
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        log_file = (self.out / "islands" / f"{island.name}.log").open("a")
        island.process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log_file.close()

    def wait_for_islands(self) -> None:
        """Before the first work: every island joins (or is given up on and restarted after
        rl.rollout_timeout_s), so the trainer does not generate what they are starting to."""
        deadline = time.monotonic() + self.rl.rollout_timeout_s
        while time.monotonic() < deadline:
            self._admit()
            if all(i.incarnation is not None for i in self.islands.values()):
                return
            for island in self.islands.values():
                if island.process is not None and island.process.poll() is not None:
                    raise ValueError(
                        f"rollout island {island.name} could not start: see "
                        f"{self.out / 'islands' / (island.name + '.log')}"
                    )
            time.sleep(0.05)
        log.warning("rl: not every rollout island joined within %.0f s", self.rl.rollout_timeout_s)

    def close(self) -> None:
        self.view.set("stop", "1")
        for island in self.islands.values():
            if island.process is not None and island.process.poll() is None:
                try:
                    island.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    kill_session(island.process)

    # --- weights ----------------------------------------------------------------------------

    def publish(self, version: int) -> int:
        """Make the policy's current weights version `version`; returns the bytes sent."""
        self.version = version
        return self.publisher.publish(flat_parameters(self.model), version)

    # --- work -------------------------------------------------------------------------------

    def issue(self, step: int, prompts: list[str], seeds: list[int], min_version: int) -> None:
        """Hand out the answers of update `step`: one slice per configured island."""
        count = len(self.islands)
        cuts = [round(i * len(prompts) / count) for i in range(count + 1)]
        slices = []
        for i, name in enumerate(self.islands):
            lo, hi = cuts[i], cuts[i + 1]
            work = {
                "step": step, "min_version": min_version, "prompts": prompts[lo:hi],
                "seeds": seeds[lo:hi], "max_new_tokens": self.rl.max_new_tokens,
                "temperature": self.rl.temperature, "log_probs": self.measures_behaviour,
            }  # fmt: skip
            slices.append(Slice(step, lo, hi, work, island=name))
        self.slices[step] = slices
        for piece in slices:
            self._send(piece, self.islands[piece.island])

    def issued(self, step: int) -> bool:
        return step in self.slices

    def _send(self, piece: Slice, island: Island) -> None:
        if island.incarnation is None:
            piece.island = None  # waits for an admitted island (or the trainer)
            return
        island.issued += 1
        piece.island, piece.issued_at = island.name, time.monotonic()
        piece.key = f"work/{island.name}/{island.incarnation}/{island.issued}"
        fault = self.faults.pop((island.name, piece.step), None)  # a scripted fault, once
        if fault:
            strike = {"kind": fault, "island": island.name, "step": piece.step}
            self.struck.append(strike | {"injected_at": time.time(), "detected_at": None})
        payload = json.dumps({**piece.work, "id": piece.key, "fault": fault}).encode()
        put_sealed(self.view, self.token, piece.key, payload, piece.key)
        island.outstanding.append(piece)

    def collect(self, step: int) -> tuple[list[dict[str, Any]], float]:
        """Every slice's result for update `step`, in order; and the seconds waited."""
        started = time.perf_counter()
        pieces = self.slices[step]
        while any(p.result is None for p in pieces):
            self._admit()
            self._supervise()
            self._receive()
            self._place(pieces)
            time.sleep(POLL_S)
        del self.slices[step]
        return [p.result for p in pieces], time.perf_counter() - started

    def _place(self, pieces: list[Slice]) -> None:
        """Slices without an island go to the admitted island with least work; with none
        admitted, the trainer generates them itself."""
        for piece in pieces:
            if piece.result is not None or piece.island is not None:
                continue
            admitted = [i for i in self.islands.values() if i.incarnation is not None]
            if admitted:
                self._send(piece, min(admitted, key=lambda i: len(i.outstanding)))
                continue
            answers, stopped, seconds = generate(
                self.model, self.tokenizer, piece.work["prompts"], self.rl.max_new_tokens,
                self.rl.temperature, piece.work["seeds"],
            )  # fmt: skip
            piece.result = {"version": self.version, "answers": answers, "stopped": stopped}
            piece.result |= {"seconds": seconds, "behaviour": None, "island": "trainer"}
            self.counters.local += piece.hi - piece.lo

    # --- islands ----------------------------------------------------------------------------

    def _admit(self) -> None:
        for island in self.islands.values():
            payload = get_sealed(
                self.view, self.token, f"hello/{island.name}", "hello", island.name
            )
            if payload is None:
                continue
            hello = json.loads(payload)
            incarnation = str(hello.get("incarnation", ""))
            if not incarnation or incarnation in island.seen:
                continue  # already answered (or a replayed hello)
            island.seen.add(incarnation)
            verdict = self._verdict(hello.get("fingerprint"))
            key = f"verdict/{island.name}/{incarnation}"
            put_sealed(self.view, self.token, key, json.dumps(verdict).encode(), key)
            if verdict["ok"]:
                island.incarnation, island.issued = incarnation, 0
                island.beat_at = time.monotonic()  # its first beat may take a while
                self._rejoined(island.name)
                log.info("rl: rollout island %s joined", island.name)
            else:
                log.warning("rl: refused rollout island %s: %s", island.name, verdict["reason"])

    def _verdict(self, theirs: Any) -> dict[str, Any]:
        if not isinstance(theirs, dict):
            return {"ok": False, "reason": "no fingerprint"}
        ours = self.print
        differing = [
            f"model.{k}: {theirs.get('model', {}).get(k)!r} there, {v!r} here"
            for k, v in ours["model"].items()
            if not isinstance(theirs.get("model"), dict) or theirs["model"].get(k) != v
        ]
        if theirs.get("tokenizer") != ours["tokenizer"]:
            differing.append("tokenizer: another tokenizer.json")
        if differing:
            return {"ok": False, "reason": "another model fingerprint: " + "; ".join(differing)}
        return {"ok": True}

    def _supervise(self) -> None:
        """An island is lost and restarted when its process ended, when its heartbeat stopped
        while it held work (a process started by hand elsewhere, a cut link), or when its
        oldest work is overdue (a hang or a stall: alive, but no answer)."""
        now = time.monotonic()
        self._read_beats(now)
        for island in self.islands.values():
            exited = island.process is not None and island.process.poll() is not None
            if not self.rl.spawn:  # not ours to watch: a dead one only stops beating
                exited = False
            silent = bool(island.outstanding) and (
                now - island.beat_at > self.rl.heartbeat_timeout_s
            )
            overdue = any(now - p.issued_at > self.rl.rollout_timeout_s for p in island.outstanding)
            if not (exited or silent or overdue):
                continue
            guard, why = (
                ("exit", "exited")
                if exited
                else ("heartbeat", f"stopped beating for {self.rl.heartbeat_timeout_s:.0f} s")
                if silent
                else ("rollout timeout", f"sent nothing for {self.rl.rollout_timeout_s:.0f} s")
            )
            in_flight = sum(p.hi - p.lo for p in island.outstanding)
            log.warning(
                "rl: rollout island %s %s; %d answers in flight are generated again",
                island.name, why, in_flight,
            )  # fmt: skip
            self.counters.lost += in_flight
            self._detected(island.name, guard, in_flight)
            for piece in island.outstanding:
                piece.island = None
            island.outstanding = []
            if island.process is not None and not exited:
                kill_session(island.process)
                island.process.wait()
            self.counters.restarts += 1
            self._start(island)

    def _read_beats(self, now: float) -> None:
        """Note when each admitted island's heartbeat last changed. Beats are not sealed: a
        forged one can only delay the detection of a dead island to rl.rollout_timeout_s."""
        if now - self.beats_read_at < BEATS_READ_S:
            return
        self.beats_read_at = now
        for island in self.islands.values():
            key = f"beat/{island.name}/{island.incarnation}"
            if island.incarnation is None or not self.view.check([key]):
                continue
            beat = self.view.get(key)
            if beat != island.beat:
                island.beat, island.beat_at = beat, now

    def _receive(self) -> None:
        for island in self.islands.values():
            for piece in list(island.outstanding):
                key = piece.key.replace("work/", "result/", 1)
                if not self.view.check([key]):
                    continue
                payload = get_sealed(self.view, self.token, key, key)
                self.view.delete_key(key)
                island.outstanding.remove(piece)
                result = self._checked(payload, piece)
                if result is None:
                    self.counters.refused += piece.hi - piece.lo
                    piece.island = None
                    continue
                if result["version"] < piece.work["min_version"]:
                    self.counters.dropped_stale += piece.hi - piece.lo
                    piece.island = None
                    continue
                island.tokens += sum(len(a) for a in result["answers"])
                island.seconds += result["seconds"]
                piece.result = result | {"island": island.name}

    def _checked(self, payload: bytes | None, piece: Slice) -> dict[str, Any] | None:
        """The result if its MAC and every field hold; None (logged) otherwise."""
        problem = "its MAC does not hold" if payload is None else None
        result: Any = None
        if problem is None:
            try:
                result = json.loads(payload)
            except ValueError:
                problem = "not JSON"
        if problem is None:
            problem = self._problem(result, piece)
        if problem:
            log.warning("rl: refused a result for update %d: %s", piece.step, problem)
            return None
        return result

    def _problem(self, result: Any, piece: Slice) -> str | None:
        size, vocab = piece.hi - piece.lo, self.model.cfg.vocab_size
        if not isinstance(result, dict) or result.get("id") != piece.key:
            return "not the result of this work"
        version, answers = result.get("version"), result.get("answers")
        if not isinstance(version, int) or not 0 <= version <= self.version:
            return f"version {version!r} was never published"
        if not isinstance(answers, list) or len(answers) != size:
            return f"{size} answers expected"
        longest = self.rl.max_new_tokens + 1
        for answer in answers:
            if not isinstance(answer, list) or len(answer) > longest:
                return "an answer is not a list of at most max_new_tokens + 1 ids"
            if not all(isinstance(t, int) and 0 <= t < vocab for t in answer):
                return "an answer holds an id outside the vocabulary"
        if not isinstance(result.get("seconds"), int | float) or not math.isfinite(
            result["seconds"]
        ):
            return "seconds is not a number"
        behaviour = result.get("behaviour")
        if piece.work["log_probs"]:
            if not isinstance(behaviour, list) or len(behaviour) != size:
                return "log-probabilities missing"
            for logp, answer in zip(behaviour, answers, strict=True):
                if not isinstance(logp, list) or len(logp) != len(answer):
                    return "log-probabilities do not match the answers"
                if not all(isinstance(v, int | float) and -1e4 < v <= 0 for v in logp):
                    return "a log-probability is out of range"
        return None

    def _detected(self, name: str, guard: str, lost: int) -> None:
        for strike in self.struck:
            if strike["island"] == name and strike["detected_at"] is None:
                strike |= {"detected_at": time.time(), "guard": guard, "answers_lost": lost}

    def _rejoined(self, name: str) -> None:
        for strike in self.struck:
            if strike["island"] == name and strike["detected_at"] and "rejoined_at" not in strike:
                strike["rejoined_at"] = time.time()

    # --- what a person watches --------------------------------------------------------------

    def tokens_per_s(self) -> dict[str, float]:
        return {
            i.name: i.tokens / i.seconds if i.seconds > 0 else 0.0 for i in self.islands.values()
        }
