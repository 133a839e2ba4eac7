"""`ostinato rl`: GRPO post-training of a model made by `ostinato train` (DESIGN: "Reason by
reinforcement").

Each update: take the next `rl.prompts` tasks in a seeded order, sample `rl.group_size` answers
to each with the serving engine, score them with the task's rule, and take one AdamW step on
the GRPO loss (ostinato.rl.grpo). Here the trainer generates its own rollouts in lock-step
(`rl.rollout_islands = 0`): every rollout comes from the policy it updates (staleness 0).

Everything an update depends on is a function of the parameters, the optimizer state and the
update's number (the prompt order is seeded, every answer's sampling seed is fixed), so a run
killed at any point and resumed from its last checkpoint ends bit-identical on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ostinato.checkpoint.state import (
    find_resume_point,
    init_optimizer_state,
    restore,
    tensor_state,
)
from ostinato.checkpoint.store import CheckpointWriter
from ostinato.config import CheckpointConfig, Config, save_config
from ostinato.rl.config import RLConfig
from ostinato.rl.fleet import FleetCounters, RolloutFleet
from ostinato.rl.grpo import group_advantages, grpo_loss, token_log_probs
from ostinato.rl.policy import (
    TOKENIZER_FILE,
    Policy,
    check_supported,
    load_policy,
    prompts_of,
    rollout_faults,
)
from ostinato.rl.rollout import Generated, Rollout, accuracy, rollouts, scored, work_of
from ostinato.train.metrics import MetricsLog, ProgressDisplay

log = logging.getLogger("ostinato")


@dataclass
class RLResult:
    out: Path
    step: int
    initial_accuracy: float
    final_accuracy: float
    seconds: dict[str, float] = field(default_factory=dict)
    started_at: float | None = None  # unix time of the first start (before its evaluation)
    samples: list[tuple[Any, str]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)  # scripted strikes, and guards
    counters: dict[str, int] = field(default_factory=dict)  # of the rollout islands


def batch_of(items: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + answer ids, right-padded (B, L), and the mask (B, L-1) of the positions whose
    next token is an answer token: where the loss counts."""
    lengths = [len(r.prompt) + len(r.answer) for r in items]
    tokens = torch.zeros(len(items), max(lengths), dtype=torch.long)
    mask = torch.zeros(len(items), max(lengths) - 1)
    for row, r in enumerate(items):
        ids = r.prompt + r.answer
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, len(r.prompt) - 1 : len(ids) - 1] = 1.0
    return tokens, mask


def behaviour_of(items: list[Rollout], old: torch.Tensor) -> torch.Tensor | None:
    """Per-token log-probs of the policies that generated the rollouts, aligned with `old`
    (the update's own): what the island measured where it did (stale rollouts, or weights
    pushed as quantized deltas), else `old` itself (importance weight 1). None when no
    rollout carries its own."""
    if all(r.behaviour is None for r in items):
        return None
    behaviour = old.clone()
    for row, r in enumerate(items):
        if r.behaviour is not None:
            start = len(r.prompt) - 1
            behaviour[row, start : start + len(r.behaviour)] = torch.tensor(r.behaviour)
    return behaviour


def update(policy: Policy, generated: Generated, rl: RLConfig) -> dict[str, float]:
    """One AdamW step on the GRPO loss of a batch of rollouts; what it measured."""
    model, items = policy.model, generated.rollouts
    rewards = torch.tensor([r.reward for r in items])
    advantages = group_advantages(rewards, rl.group_size)
    tokens, mask = batch_of(items)
    with torch.no_grad():
        old = token_log_probs(model(tokens), tokens)
        ref = None
        if policy.reference is not None:
            ref = token_log_probs(policy.reference(tokens), tokens)
    behaviour = behaviour_of(items, old)
    log_probs = token_log_probs(model(tokens), tokens)
    parts = grpo_loss(
        log_probs, old, advantages, mask, rl.clip, rl.kl, ref, behaviour, rl.importance_cap
    )
    policy.optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    norm = 0.0
    if rl.grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip))
    policy.optimizer.step()
    return {
        "loss": float(parts.loss.detach()),
        "clip_fraction": parts.clip_fraction,
        "kl": parts.kl,
        "importance_weight": parts.importance_weight,
        "grad_norm": norm,
    }


def save(writer: CheckpointWriter, policy: Policy, step: int, state: dict[str, Any]) -> None:
    meta = {
        "parts": ["model", "optimizer"],
        "config": policy.config.to_dict(),
        "train_state": {"step": step},
        "rl": state,
    }
    files = {TOKENIZER_FILE: policy.tokenizer.to_str().encode()}
    writer.save(step, tensor_state(policy.model, policy.optimizer), meta, files)


def run_rl(
    cfg: Config,
    out: Path,
    resume: str = "auto",
    explicit: set[str] = frozenset(),
    progress: bool = True,
) -> RLResult:
    check_supported(cfg.rl)
    if cfg.rl.threads:
        torch.set_num_threads(cfg.rl.threads)
    faults = rollout_faults(cfg.faults.schedule, cfg.rl)
    policy, init = load_policy(cfg, explicit)
    run = RLRun(policy, cfg.rl, out, cfg.checkpoint.keep, faults)
    run.start(resume, init)
    try:
        return run.loop(progress)
    finally:
        run.close()


class RLRun:
    """One RL run's loop and what it keeps: the policy, its checkpoints and metrics, the time
    spent by kind, and the rollout islands when there are any."""

    def __init__(
        self,
        policy: Policy,
        rl: RLConfig,
        out: Path,
        keep: int,
        faults: dict[tuple[str, int], str] | None = None,
    ):
        self.policy, self.rl, self.out, self.faults = policy, rl, out, faults
        out.mkdir(parents=True, exist_ok=True)
        self.writer = CheckpointWriter(
            out / "checkpoints", CheckpointConfig(keep, async_save=False)
        )
        self.step, self.state = 0, {}
        self.seconds: Counter[str] = Counter()
        self.heldout = policy.tasks.heldout[: rl.eval_problems]
        self.fleet: RolloutFleet | None = None
        self.metrics: MetricsLog | None = None

    def start(self, resume: str, init: Path) -> None:
        policy = self.policy
        save_config(policy.config, self.out / "config.toml")
        (self.out / TOKENIZER_FILE).write_text(policy.tokenizer.to_str())
        resume_from = find_resume_point(resume, self.out / "checkpoints")
        init_optimizer_state(policy.model, policy.optimizer)
        self.state = {"init": str(init)}
        if resume_from is not None:
            tensors = tensor_state(policy.model, policy.optimizer)
            meta = restore(resume_from, tensors, policy.config.to_dict())
            self.step, self.state = meta["train_state"]["step"], meta["rl"]
            log.info("rl: resumed from %s at update %d", resume_from, self.step)
        self.seconds.update(self.state.get("seconds", {}))
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step)
        if self.rl.rollout_islands:
            self.fleet = RolloutFleet(
                self.rl, policy.model, policy.tokenizer, self.out, self.faults
            )
            # the counts of lost, refused, stale... rollouts go on from the checkpoint's
            self.fleet.counters = FleetCounters(**self.state.get("rollouts", {}))
            self.fleet.wait_for_islands()
        if "initial_accuracy" not in self.state:
            self.state["started_at"] = time.time()  # the curve's zero, across resumes
            self.state["initial_accuracy"] = self.evaluate()[0]
            log.info("rl: held-out accuracy before any update %.3f", self.state["initial_accuracy"])

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        if self.metrics is not None:
            self.metrics.close()

    def evaluate(self) -> tuple[float, list[tuple[Any, str]]]:
        started = time.perf_counter()
        policy = self.policy
        result = accuracy(
            policy.model,
            policy.tokenizer,
            self.heldout,
            policy.tasks.reward,
            self.rl.max_new_tokens,
        )
        self.seconds["evaluate"] += time.perf_counter() - started
        return result

    def rollouts(self, step: int) -> tuple[Generated, dict[str, Any]]:
        """The rollouts of update `step`: generated here, or by the rollout islands; and what
        the islands' side of it measured."""
        policy, rl = self.policy, self.rl
        tasks = prompts_of(policy.tasks.train, rl, step)
        if self.fleet is None:
            generated = rollouts(
                policy.model, policy.tokenizer, tasks, policy.tasks.reward, rl.group_size,
                rl.max_new_tokens, rl.temperature, rl.seed, step, rl.format_reward,
            )  # fmt: skip
            self.seconds["generate"] += generated.seconds
            return generated, {}
        fleet, pushed = self.fleet, {}
        if fleet.version < step - 1:
            started = time.perf_counter()
            pushed["weight_push_bytes"] = fleet.publish(step - 1)
            pushed["weight_push_s"] = time.perf_counter() - started
            self.seconds["weight_push"] += pushed["weight_push_s"]
        for ahead in range(step, min(rl.steps, step + rl.max_staleness) + 1):
            if not fleet.issued(ahead):
                prompts, seeds = work_of(
                    prompts_of(policy.tasks.train, rl, ahead), rl.group_size, rl.seed, ahead
                )
                fleet.issue(ahead, prompts, seeds, max(0, ahead - 1 - rl.max_staleness))
        results, waited = fleet.collect(step)
        self.seconds["waiting"] += waited
        answers = [a for r in results for a in r["answers"]]
        versions = [r["version"] for r in results for _ in r["answers"]]
        behaviour = [
            (r["behaviour"] or [None] * len(r["answers"]))[i]
            for r in results
            for i in range(len(r["answers"]))
        ]
        generated = scored(
            policy.tokenizer, tasks, rl.group_size, answers, versions, policy.tasks.reward,
            rl.format_reward, behaviour,
        )  # fmt: skip
        # the islands' generation rate together: each slice's tokens over its own seconds
        generated.seconds = generated.tokens / max(1e-9, sum(island_rates(results)))
        counters = dataclasses.asdict(fleet.counters)
        return generated, {
            **pushed,
            "trainer_idle_s": waited,
            "island_tokens_per_s": fleet.tokens_per_s(),
            **{
                f"{k}_rollouts" if k != "restarts" else "island_restarts": v
                for k, v in counters.items()
            },
        }

    def loop(self, progress: bool) -> RLResult:
        rl = self.rl
        last_accuracy, samples = self.state.get("accuracy", self.state["initial_accuracy"]), []
        display = ProgressDisplay(
            rl.steps, self.step, max(1, rl.steps // 20), progress, label="rl", describe=_status
        )
        try:
            while self.step < rl.steps:
                self.step += 1
                step = self.step
                generated, fleet_side = self.rollouts(step)
                started = time.perf_counter()
                measured = update(self.policy, generated, rl)
                self.seconds["train"] += time.perf_counter() - started
                record = {"step": step, **summarise(generated, step), **fleet_side, **measured}
                record["time"] = time.time()
                if step % rl.eval_every == 0 or step == rl.steps:
                    last_accuracy, samples = self.evaluate()
                    record["accuracy"] = last_accuracy
                record["seconds"] = dict(self.seconds)
                self.metrics.write(record)
                display.update(record, rl.steps)
                if step % rl.checkpoint_every == 0 or step == rl.steps:
                    started = time.perf_counter()
                    self.state |= {"accuracy": last_accuracy, "seconds": dict(self.seconds)}
                    if self.fleet is not None:
                        self.state["rollouts"] = dataclasses.asdict(self.fleet.counters)
                    save(self.writer, self.policy, step, self.state)
                    self.seconds["checkpoint"] += time.perf_counter() - started
        finally:
            display.close()
        if not samples:
            last_accuracy, samples = self.evaluate()
        result = RLResult(
            self.out, self.step, self.state["initial_accuracy"], last_accuracy,
            dict(self.seconds), samples[:3],
        )  # fmt: skip
        result.started_at = self.state.get("started_at")
        if self.fleet is not None:
            result.faults = self.fleet.struck
            result.counters = dataclasses.asdict(self.fleet.counters)
        write_summary(result)
        return result


def island_rates(results: list[dict[str, Any]]) -> list[float]:
    return [sum(map(len, r["answers"])) / r["seconds"] for r in results if r["seconds"] > 0]


def summarise(generated: Generated, step: int) -> dict[str, Any]:
    """What a batch of rollouts says: reward, right answers, length, staleness, speed."""
    items, count = generated.rollouts, len(generated.rollouts)
    return {
        "reward": sum(r.reward for r in items) / count,
        "solved": sum(r.reward >= 1.0 for r in items) / count,
        "response_length": generated.tokens / count,
        "staleness": dict(Counter(str(step - 1 - r.version) for r in items)),
        "rollout_tokens_per_s": generated.tokens_per_s,
    }


def _status(record: dict[str, Any]) -> str:
    status = f"reward {record['reward']:.3f}  {record['rollout_tokens_per_s']:,.0f} tok/s"
    if "accuracy" in record:
        status += f"  held-out {record['accuracy']:.0%}"
    return status


def write_summary(result: RLResult) -> None:
    summary = {
        "steps": result.step,
        "initial_accuracy": result.initial_accuracy,
        "final_accuracy": result.final_accuracy,
        "started_at": result.started_at,
        "seconds": result.seconds,
    }
    (result.out / "summary.json").write_text(json.dumps(summary, indent=1))
