"""A rollout island: a process that generates rollouts for a GRPO trainer (ostinato.rl.fleet).

It connects to the trainer's store, says which model it would run (its fingerprint; refused by
name if it is not the trainer's), takes the model's shape and tokenizer from the trainer (or
from its own --model-from checkpoint), then loops: take the next work item, load the newest
weights the trainer published if it has not yet (every payload sealed with a MAC under the
fleet token, bound to its version), generate with the serving engine, and send back the answers
with the version that made them and their per-token log-probabilities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.config import ModelConfig
from ostinato.errors import Refused
from ostinato.fleet import wire
from ostinato.model.llama import Llama
from ostinato.rl.grpo import token_log_probs
from ostinato.rl.rollout import generate
from ostinato.rl.vllm_rollout import VllmRollouts
from ostinato.rl.weights import Receiver, get_sealed, load_flat, put_sealed, rl_prefix

log = logging.getLogger("ostinato")
POLL_S = 0.01


def fingerprint(model: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    return {"model": dataclasses.asdict(model), "tokenizer": tokenizer_hash}


def strike(kind: str, model: Llama, tokenizer: Tokenizer, prompts: list[str]) -> None:
    """A scripted fault (faults.schedule), mid-generation: half the answers' tokens are made,
    then the process dies (crash: SIGKILL, no clean-up) or stops (hang: SIGSTOP, alive, its
    sockets open). The trainer must see it by its guards: the exit, or no result in time."""
    generate(model, tokenizer, prompts, 8, 1.0, list(range(len(prompts))))
    log.warning("rollout island: fault %s strikes now", kind)
    os.kill(os.getpid(), signal.SIGKILL if kind == "crash" else signal.SIGSTOP)
    time.sleep(3600)  # a stopped process resumes here only if someone sends SIGCONT


class RolloutIsland:
    def __init__(self, coordinator: str, island: str, token: str, model_from: str = ""):
        if not token:
            raise ValueError("a rollout island needs the fleet token: set OSTINATO_FLEET_TOKEN")
        self.island, self.token = island, token
        self.incarnation = os.urandom(8).hex()  # this process: a replayed hello names another
        try:
            store = wire.connect(coordinator, 30.0)
        except wire.Unreachable:
            raise wire.Unreachable(
                f"rollout island {island}: no RL trainer answers at {coordinator} (its log says "
                "where it waits for rollout islands: `rl: waiting for rollout islands at ...`)"
            ) from None
        self.view = torch.distributed.PrefixStore(rl_prefix(token), store)
        self.coordinator = coordinator
        self.model_from = model_from
        self.model: Llama | None = None
        self.tokenizer: Tokenizer | None = None
        self.weights: Receiver | None = None  # once joined
        self.vllm: VllmRollouts | None = None  # rl.engine = "vllm": generates instead of ours
        self.done = 0  # work items finished

    # --- joining ----------------------------------------------------------------------------

    def join(self) -> None:
        setup = self._wait_json("setup", 60.0)
        if self.model_from:
            from ostinato.checkpoint.reader import load_trained

            trained = load_trained(self.model_from)
            model_cfg, tokenizer = trained.config.model, trained.tokenizer
        else:
            model_cfg = ModelConfig(**setup["model"])
            tokenizer = Tokenizer.from_str(setup["tokenizer"])
        if setup.get("threads"):
            torch.set_num_threads(int(setup["threads"]))
        model = Llama(model_cfg).eval()
        if setup.get("engine") == "vllm":  # before the hello: its start takes tens of seconds
            self.vllm = VllmRollouts(model, tokenizer)
            log.info("rollout island %s: generating with vLLM", self.island)
        hello = {"fingerprint": fingerprint(model_cfg, tokenizer), "incarnation": self.incarnation}
        put_sealed(
            self.view, self.token, f"hello/{self.island}", json.dumps(hello).encode(),
            "hello", self.island,
        )  # fmt: skip
        verdict = self._wait_json(f"verdict/{self.island}/{self.incarnation}", 60.0)
        if not verdict.get("ok"):
            raise Refused(
                f"the RL trainer refused rollout island {self.island}: {verdict['reason']}"
            )
        self.model, self.tokenizer = model, tokenizer
        numel = sum(p.numel() for p in self.model.parameters())
        self.weights = Receiver(self.view, self.token, setup.get("weight_push", "full"), numel)
        self._start_heartbeat(float(setup.get("heartbeat_s", 2.0)))
        log.info("rollout island %s: joined", self.island)

    def _start_heartbeat(self, every_s: float) -> None:
        """Beat on a connection of its own (the loop's may be busy with a large weight push)
        from a thread, so a long generation never looks like a death; a stopped or killed
        process stops beating, which is what the trainer watches for."""
        store = torch.distributed.PrefixStore(
            rl_prefix(self.token), wire.connect(self.coordinator, 30.0)
        )
        key = f"beat/{self.island}/{self.incarnation}"

        def beat() -> None:
            count = 0
            while True:
                count += 1
                try:
                    store.set(key, str(count))
                except Exception:  # the trainer is gone: the work loop finds out and stops
                    return
                time.sleep(every_s)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    def _wait_json(self, key: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            payload = get_sealed(self.view, self.token, key, key)
            if payload is not None:
                return json.loads(payload)
            time.sleep(POLL_S)
        raise wire.Unreachable(f"rollout island: no answer to {key} within {timeout_s:.0f} s")

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self.join()
        while True:
            key = f"work/{self.island}/{self.incarnation}/{self.done + 1}"
            payload = get_sealed(self.view, self.token, key, key)
            if payload is None:
                if self.view.check(["stop"]):
                    return
                time.sleep(POLL_S)
                continue
            result = self.generate(json.loads(payload))
            self.done += 1
            context = f"result/{self.island}/{self.incarnation}/{self.done}"
            put_sealed(self.view, self.token, context, json.dumps(result).encode(), context)

    @property
    def version(self) -> int:
        """The policy version this island holds (-1: none yet)."""
        return -1 if self.weights is None else self.weights.version

    def _refresh(self) -> None:
        """Load the newest weights the trainer published, if newer than ours."""
        if self.weights.refresh():
            load_flat(self.model, self.weights.held)
            if self.vllm is not None:
                self.vllm.load(self.model)

    def generate(self, work: dict[str, Any]) -> dict[str, Any]:
        while self.version < int(work["min_version"]):
            self._refresh()
            if self.version < int(work["min_version"]):
                time.sleep(POLL_S)
        self._refresh()
        prompts, seeds = work["prompts"], work["seeds"]
        if work.get("fault"):
            strike(work["fault"], self.model, self.tokenizer, prompts)
        if self.vllm is not None:
            ids = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
            answers, stopped, seconds = self.vllm.generate(
                ids, int(work["max_new_tokens"]), float(work["temperature"]), seeds
            )
        else:
            answers, stopped, seconds = generate(
                self.model, self.tokenizer, prompts, int(work["max_new_tokens"]),
                float(work["temperature"]), seeds,
            )  # fmt: skip
        behaviour = self._log_probs(prompts, answers) if work.get("log_probs") else None
        return {
            "id": work["id"], "version": self.version, "answers": answers, "stopped": stopped,
            "seconds": seconds, "behaviour": behaviour,
        }  # fmt: skip

    @torch.no_grad()
    def _log_probs(self, prompts: list[str], answers: list[list[int]]) -> list[list[float]]:
        """Per-token log-probabilities of each answer under the policy that generated it."""
        out = []
        for prompt, answer in zip(prompts, answers, strict=True):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            tokens = torch.tensor([ids + answer])
            logp = token_log_probs(self.model(tokens), tokens)[0, len(ids) - 1 :]
            out.append(logp.tolist())
        return out
