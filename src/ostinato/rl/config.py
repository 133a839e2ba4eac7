"""The `[rl]` section: GRPO post-training of a model that `ostinato train` made (ostinato.rl)."""

from __future__ import annotations

from dataclasses import dataclass

from ostinato.schema import option


@dataclass
class RLConfig:
    init: str = option("", "run directory or checkpoint of `ostinato train` to start from")
    steps: int = option(20, "policy updates", ge=1)
    prompts: int = option(8, "prompts per update (each answered group_size times)", ge=1)
    group_size: int = option(8, "answers sampled per prompt; advantages are relative to it", ge=2)
    max_new_tokens: int = option(96, "longest answer sampled", ge=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts", gt=0.0)
    lr: float = option(1e-4, "AdamW learning rate of the policy (constant)", ge=0.0)
    clip: float = option(0.2, "PPO clipping of the probability ratio: 1 - clip .. 1 + clip", gt=0.0)
    kl: float = option(0.0, "weight of the KL to the initial policy (0: no reference model)", ge=0)
    importance_cap: float = option(
        2.0, "truncation of the per-token importance weights of stale rollouts", ge=1.0
    )
    format_reward: float = option(
        0.1, "reward for ending with exactly one '#### <integer>', right or wrong", ge=0.0
    )
    task: str = option(
        "reasoning",
        "prompts: the init run's training problems, or the countdown task",
        choices=("reasoning", "countdown"),
    )
    max_staleness: int = option(
        0, "policy versions a rollout may lag the update it feeds (older ones are dropped)", ge=0
    )
    rollout_islands: int = option(
        0, "processes that generate rollouts (0: the trainer generates them, lock-step)", ge=0
    )
    rollout_timeout_s: float = option(
        120.0, "a rollout island that sends no result for this long is restarted", gt=0.0
    )
    heartbeat_timeout_s: float = option(
        10.0,
        "a rollout island whose heartbeat is this old while it holds work is lost (a process "
        "ended on another host, a cut link): seconds, where a slow slice may take minutes",
        gt=0.0,
    )
    weight_push: str = option(
        "full",
        "weights to rollout islands: whole fp32, or deltas quantized per block (error feedback)",
        choices=("full", "int8", "int4"),
    )
    bind: str = option(
        "127.0.0.1:0", "where the trainer's store listens for rollout islands (port 0: any free)"
    )
    spawn: bool = option(
        True, "start the rollout islands here; false: wait for `ostinato rl rollout` elsewhere"
    )
    engine: str = option(
        "ostinato",
        "what generates rollouts: the batched engine of `ostinato serve`, or vLLM on rollout "
        "islands whose Python has it installed (rl/vllm_rollout.py)",
        choices=("ostinato", "vllm"),
    )
    eval_every: int = option(10, "updates between held-out evaluations (greedy)", ge=1)
    eval_problems: int = option(100, "held-out problems per evaluation", ge=1)
    checkpoint_every: int = option(10, "updates between checkpoints", ge=1)
    seed: int = option(0, "seed of the prompt order and of the sampling")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", ge=0.0)
    threads: int = option(0, "CPU threads of the trainer (0: torch's default)", ge=0)
    island_threads: int = option(0, "CPU threads of each rollout island (0: as rl.threads)", ge=0)
