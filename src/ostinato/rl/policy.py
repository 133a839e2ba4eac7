"""What an RL run trains, on what, and what it refuses before it starts: the policy loaded from
rl.init (its model, tokenizer and data kept; a recipe's [model] or [data] must agree), the
task set, the seeded prompt order, and the rollout islands' scripted faults."""

from __future__ import annotations

import copy
import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ostinato.checkpoint.reader import load_trained, resolve_checkpoint
from ostinato.checkpoint.state import differing_fields
from ostinato.checkpoint.store import CheckpointError
from ostinato.config import Config
from ostinato.data.tokenizer import check_vocab
from ostinato.errors import BadInput
from ostinato.faults.spec import parse_faults
from ostinato.model.llama import Llama
from ostinato.rl.config import RLConfig
from ostinato.rl.tasks import TaskSet, task_set
from ostinato.rl.vllm_rollout import check_installed
from ostinato.train.state import TOKENIZER_FILE


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
    if rl.max_staleness and not rl.rollout_islands:
        raise BadInput(
            f"rl.max_staleness = {rl.max_staleness}: only rollout islands generate ahead of the "
            "trainer; set rl.rollout_islands >= 1, or rl.max_staleness = 0"
        )
    if rl.engine == "vllm" and not rl.rollout_islands:
        raise BadInput(
            "rl.engine = 'vllm': vLLM generates on rollout islands; set rl.rollout_islands >= 1 "
            "(or rl.engine = 'ostinato' to generate in the trainer)"
        )
    if rl.engine == "vllm" and rl.spawn:
        check_installed(sys.executable)  # the islands started here run this Python


def rollout_faults(schedule: str, rl: RLConfig) -> dict[tuple[str, int], str]:
    """faults.schedule for rollout islands: `crash@island=r0,step=3` or `hang@...,step=N` strike
    island r0 mid-generation of update N's rollouts (ostinato.faults.spec's syntax)."""
    if not schedule:
        return {}
    names = [f"r{i}" for i in range(max(1, rl.rollout_islands))]
    faults = parse_faults(schedule, names, steps=rl.steps)
    for fault in faults:
        if fault.kind not in ("crash", "hang") or fault.step is None or not rl.rollout_islands:
            raise BadInput(
                f"faults.schedule: {fault.kind}@island={fault.island}: an RL run takes crash and "
                "hang of a rollout island at an update (step=N), with rl.rollout_islands >= 1"
            )
    return {(f.island, f.step): f.kind for f in faults}


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
