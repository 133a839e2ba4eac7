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

import copy
import dataclasses
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.checkpoint.reader import load_trained, resolve_checkpoint
from ostinato.checkpoint.state import (
    differing_fields,
    find_resume_point,
    init_optimizer_state,
    restore,
    tensor_state,
)
from ostinato.checkpoint.store import CheckpointError, CheckpointWriter
from ostinato.config import CheckpointConfig, Config, save_config
from ostinato.data.tokenizer import check_vocab
from ostinato.errors import BadInput
from ostinato.model.llama import Llama
from ostinato.rl.config import RLConfig
from ostinato.rl.grpo import group_advantages, grpo_loss, token_log_probs
from ostinato.rl.rollout import Generated, Rollout, accuracy, rollouts
from ostinato.rl.tasks import TaskSet, task_set
from ostinato.train.metrics import MetricsLog, ProgressDisplay

log = logging.getLogger("ostinato")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class RLResult:
    out: Path
    step: int
    initial_accuracy: float
    final_accuracy: float
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[Any, str]] = field(default_factory=list)


@dataclass
class Policy:
    """What an RL run trains and what it measures against."""

    model: Llama
    optimizer: torch.optim.AdamW
    tokenizer: Tokenizer
    tasks: TaskSet
    reference: Llama | None  # the initial policy, for the KL (rl.kl > 0)
    config: Config  # the run's: the init run's model and data, this recipe's rl


def check_supported(rl: RLConfig) -> None:
    """Refuse what this trainer does not do yet, by field, before anything is loaded."""
    if not rl.init:
        raise BadInput("rl.init is empty: set it to a run directory of `ostinato train`")
    if rl.rollout_islands:
        raise BadInput(
            f"rl.rollout_islands = {rl.rollout_islands}: rollout islands in their own processes "
            "are not built yet; allowed: 0 (the trainer generates its rollouts, lock-step)"
        )


def load_policy(cfg: Config, explicit: set[str]) -> tuple[Policy, Path]:
    """The policy to train, from the checkpoint rl.init names. The run takes that checkpoint's
    model and data sections; a [model] or [data] the recipe sets must agree with them."""
    try:
        init = resolve_checkpoint(cfg.rl.init)
    except CheckpointError as exc:
        raise BadInput(f"rl.init: {exc}") from None
    trained = load_trained(init)
    for section in ("model", "data"):
        if section not in explicit:
            continue
        ours = dataclasses.asdict(getattr(cfg, section))
        theirs = dataclasses.asdict(getattr(trained.config, section))
        differing = differing_fields(section, theirs, ours, "rl.init")
        if differing:
            raise BadInput(
                f"rl.init {init} was trained with another {section}: " + "; ".join(differing)
            )
    check_vocab(trained.tokenizer, trained.config.model.vocab_size, str(init / TOKENIZER_FILE))
    config = dataclasses.replace(trained.config, rl=cfg.rl, checkpoint=cfg.checkpoint)
    try:
        tasks = task_set(cfg.rl.task, trained.config.data)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    model = trained.model.train()
    reference = None
    if cfg.rl.kl > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.rl.lr, betas=(0.9, 0.99), weight_decay=0.0
    )
    return Policy(model, optimizer, trained.tokenizer, tasks, reference, config), init


def prompts_of(tasks: list[Any], rl: RLConfig, step: int) -> list[Any]:
    """The tasks of update `step` (1-based): the next rl.prompts of a seeded order, cycling."""
    order = list(range(len(tasks)))
    random.Random(rl.seed).shuffle(order)
    first = (step - 1) * rl.prompts
    return [tasks[order[(first + i) % len(order)]] for i in range(rl.prompts)]


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
    log_probs = token_log_probs(model(tokens), tokens)
    parts = grpo_loss(
        log_probs, old, advantages, mask, rl.clip, rl.kl, ref, None, rl.importance_cap
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
    rl = cfg.rl
    check_supported(rl)
    if rl.threads:
        torch.set_num_threads(rl.threads)
    policy, init = load_policy(cfg, explicit)
    out.mkdir(parents=True, exist_ok=True)
    save_config(policy.config, out / "config.toml")
    (out / TOKENIZER_FILE).write_text(policy.tokenizer.to_str())
    checkpoints = out / "checkpoints"
    resume_from = find_resume_point(resume, checkpoints)
    init_optimizer_state(policy.model, policy.optimizer)
    step, state = 0, {"init": str(init)}
    if resume_from is not None:
        meta = restore(
            resume_from, tensor_state(policy.model, policy.optimizer), policy.config.to_dict()
        )
        step, state = meta["train_state"]["step"], meta["rl"]
        log.info("rl: resumed from %s at update %d", resume_from, step)
    writer = CheckpointWriter(
        checkpoints, CheckpointConfig(keep=cfg.checkpoint.keep, async_save=False)
    )
    metrics = MetricsLog(out / "metrics.jsonl", step)
    seconds = Counter(state.get("seconds", {}))
    heldout = policy.tasks.heldout[: rl.eval_problems]

    def evaluate() -> tuple[float, list[tuple[Any, str]]]:
        started = time.perf_counter()
        result = accuracy(
            policy.model, policy.tokenizer, heldout, policy.tasks.reward, rl.max_new_tokens
        )
        seconds["evaluate"] += time.perf_counter() - started
        return result

    if "initial_accuracy" not in state:
        state["initial_accuracy"] = evaluate()[0]
        log.info("rl: held-out accuracy before any update %.3f", state["initial_accuracy"])
    last_accuracy, samples = state.get("accuracy", state["initial_accuracy"]), []
    display = ProgressDisplay(
        rl.steps, step, max(1, rl.steps // 20), progress, label="rl", describe=_status
    )
    try:
        while step < rl.steps:
            step += 1
            tasks = prompts_of(policy.tasks.train, rl, step)
            generated = rollouts(
                policy.model,
                policy.tokenizer,
                tasks,
                policy.tasks.reward,
                rl.group_size,
                rl.max_new_tokens,
                rl.temperature,
                rl.seed,
                step - 1,
                rl.format_reward,
            )
            seconds["generate"] += generated.seconds
            started = time.perf_counter()
            measured = update(policy, generated, rl)
            seconds["train"] += time.perf_counter() - started
            record = {
                "step": step,
                "reward": sum(r.reward for r in generated.rollouts) / len(generated.rollouts),
                "solved": sum(r.reward >= 1.0 for r in generated.rollouts)
                / len(generated.rollouts),
                "response_length": generated.tokens / len(generated.rollouts),
                "staleness": dict(Counter(str(step - 1 - r.version) for r in generated.rollouts)),
                "dropped_stale": 0,
                "rollout_tokens_per_s": generated.tokens_per_s,
                **measured,
                "time": time.time(),
            }
            if step % rl.eval_every == 0 or step == rl.steps:
                last_accuracy, samples = evaluate()
                record["accuracy"] = last_accuracy
            record["seconds"] = dict(seconds)
            metrics.write(record)
            display.update(record, rl.steps)
            if step % rl.checkpoint_every == 0 or step == rl.steps:
                started = time.perf_counter()
                state |= {"accuracy": last_accuracy, "seconds": dict(seconds)}
                save(writer, policy, step, state)
                seconds["checkpoint"] += time.perf_counter() - started
    finally:
        display.close()
        metrics.close()
    if not samples:
        last_accuracy, samples = evaluate()
    result = RLResult(
        out, step, state["initial_accuracy"], last_accuracy, dict(seconds), samples[:3]
    )
    write_summary(result)
    return result


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
        "seconds": result.seconds,
    }
    (result.out / "summary.json").write_text(json.dumps(summary, indent=1))
