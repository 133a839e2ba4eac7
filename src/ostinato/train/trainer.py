"""The island trainer: synchronous data-parallel training of one model on one island.

Reads top to bottom: set up the placement, resolve the resume point, build the rank's state
(train/state.py: tokenizer, data, model, optimizer, checkpoint, fleet), run the inner steps,
save, evaluate. Whatever reaches into a step from outside (fault injection) comes through the
step hooks (train/hooks.py), which the caller chooses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ostinato import hardware
from ostinato.checkpoint.state import find_resume_point, parameter_digest, rng_state
from ostinato.checkpoint.store import CheckpointWriter
from ostinato.config import Config, TrainConfig, save_config
from ostinato.curves import EVAL_FILE
from ostinato.data.stream import tokenize
from ostinato.errors import BadInput
from ostinato.fleet.island import total_inner_steps
from ostinato.goodput import Goodput, summarize
from ostinato.hardware import Placement, launched_world_size
from ostinato.jsonl import append_jsonl
from ostinato.startup import STARTUP_FILE, StartupClock
from ostinato.train.evaluate import Evaluation, accuracy, validation_loss
from ostinato.train.hooks import StepHooks
from ostinato.train.metrics import EventLog, MetricsLog, ProgressDisplay, summary_writer_class
from ostinato.train.parallel import (
    full_value,
    gradient_bytes,
    gradient_sync,
    is_sharded,
    replica_group,
    state_bytes,
    strategy_of,
)
from ostinato.train.remedies import guard_digests, out_of_memory_advice, roll_back, skip_spike
from ostinato.train.schedule import lr_at
from ostinato.train.state import TOKENIZER_FILE, RankState, build_state


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float | None
    parameter_digest: str  # of this rank's final parameters
    evaluation: Evaluation = field(default_factory=Evaluation)
    goodput: Goodput | None = None  # where this run's wall-clock time went (rank 0)
    strategy: str = "single"  # how the island's ranks shared the model
    world_size: int = 1
    state_bytes: int = 0  # parameters, gradients and optimizer state held by this rank
    fleet_state_bytes: list[int] | None = None  # of each rank, in a fleet (fleet/shards.py)


def train(
    cfg: Config,
    out: Path,
    resume: str = "auto",
    show_progress: bool = True,
    hooks: StepHooks | None = None,
) -> TrainResult:
    """Train per `cfg` into run directory `out`, resuming per `resume` (auto, none or a path).

    `hooks` reach into every step (faults.inject.step_hooks builds them from faults.schedule);
    a schedule given without them would silently inject nothing, so it is refused."""
    if cfg.faults.schedule and hooks is None:
        raise ValueError(
            "faults.schedule is set but no step hooks inject it: run it with `ostinato train` "
            "(or pass hooks=ostinato.faults.inject.step_hooks(cfg, out))"
        )
    if cfg.train.tensorboard:
        summary_writer_class()
    # refused by field name before a process group starts: WORLD_SIZE is torchrun's
    strategy_of(cfg.parallel, launched_world_size(), in_fleet=bool(cfg.fleet.coordinator))
    clock = StartupClock()
    clock.mark("imports")  # the command's imports are done by now
    place = hardware.setup(cfg.hardware)
    try:
        return _train(cfg, Path(out), resume, place, show_progress, hooks or StepHooks(), clock)
    except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA), or torch_npu's plain one
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            raise BadInput(out_of_memory_advice(cfg, place)) from exc
        raise
    finally:
        hardware.teardown()


def _train(
    cfg: Config,
    out: Path,
    resume: str,
    place: Placement,
    show_progress: bool,
    hooks: StepHooks,
    clock: StartupClock,
) -> TrainResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    group = dist.new_group(backend="gloo") if dist.is_initialized() else None
    writer = CheckpointWriter(out / "checkpoints", cfg.checkpoint, place.rank, group)
    resume_from = find_resume_point(resume, out / "checkpoints")
    if place.is_main:
        save_config(cfg, out / "config.toml")
    recovery_started = time.time()
    state = build_state(cfg, out, place, resume_from, resume, clock)
    # Joining a fleet may have healed the parameters since the checkpoint resumed from.
    resumed_as_saved = resume_from is not None and state.fleet is None
    writer.last_saved_step = state.step if resumed_as_saved else None
    if place.is_main:
        state.events = EventLog(out / "events.jsonl", cfg.fleet.island)
        if state.fleet is not None:
            state.fleet.events = state.events
        rejoined = state.fleet is not None and state.fleet.member.round_have > 0
        if resume_from or rejoined:  # a fresh start is not recovery; a restart is
            state.events.span("recovery", recovery_started, time.time())
    hooks.start(state, place, out)
    # eval.jsonl: the evaluations during training, then the one at the end (main rank)
    evals = (
        MetricsLog(out / EVAL_FILE, state.step, cfg.train.tensorboard) if place.is_main else None
    )
    try:
        final_loss = run_steps(cfg, state, place, writer, out, show_progress, hooks, evals)
    finally:
        if state.fleet is not None:
            state.fleet.close()
    save_checkpoint(cfg, state, writer)
    writer.wait()
    if dist.is_initialized():
        dist.barrier()
    evaluation = evaluate(cfg, state) if evaluates(state, place) else Evaluation()
    if evals is not None:  # every line is flushed as written: an error above loses none
        append_evaluation(cfg, state, place, evals, evaluation)
        evals.close()
    goodput = summarize(out, f"run {out.name}") if place.is_main else None
    digest = parameter_digest(state.model)
    held = state_bytes(state.model, state.optimizer, state.gradient_bytes)
    result = TrainResult(out, state.step, final_loss, digest, evaluation, goodput)
    result.strategy, result.world_size, result.state_bytes = state.strategy, place.world_size, held
    if state.fleet is not None:
        member = state.fleet.member  # every rank's share of the fleet state, from its tensors
        result.fleet_state_bytes = member.crew.gathered(member.shards.held_bytes())
    return result


def autocast_dtype(cfg: TrainConfig, place: Placement) -> torch.dtype | None:
    wanted = cfg.dtype if cfg.dtype != "auto" else ("bf16" if place.is_accelerator else "fp32")
    return torch.bfloat16 if wanted == "bf16" else None


def train_step(
    cfg: TrainConfig,
    state: RankState,
    place: Placement,
    schedule_step: int,
    hooks: StepHooks,
) -> tuple[float, float, str]:
    """One optimizer step with gradient accumulation: (mean loss, gradient norm, guard verdict).

    The step is applied only if the non-finite and spike guards let it through. The learning
    rate is the schedule's at `schedule_step` (fleet/island.py: FleetIsland.schedule_step)."""
    lr = lr_at(schedule_step, cfg)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    dtype = autocast_dtype(cfg, place)
    loss_sum = torch.zeros((), device=place.device)
    for micro in range(cfg.grad_accum):
        inputs, targets = next_batch(cfg, state, place, hooks)
        sync = gradient_sync(state.step_model, enabled=micro == cfg.grad_accum - 1)
        autocast = torch.autocast(place.device.type, dtype=dtype, enabled=dtype is not None)
        with sync, autocast:
            loss = hooks.loss(state, state.step_model(inputs, targets) / cfg.grad_accum)
        loss.backward()
        loss_sum += loss.detach()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(
        full_value(torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm))
    )
    if place.world_size > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= place.world_size
    state.step += 1
    verdict = state.guard.verdict(state.step, float(loss_sum), grad_norm)
    if verdict == "ok":
        verdict = state.spike_guard.verdict(float(loss_sum))
    if not state.gradient_bytes:
        state.gradient_bytes = gradient_bytes(state.model)
    if verdict == "ok":
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return float(loss_sum), grad_norm, verdict


def next_batch(
    cfg: TrainConfig, state: RankState, place: Placement, hooks: StepHooks
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's next micro-batch, on the device, as the step hooks let it through."""
    position = state.stream.consumed
    inputs, targets = state.stream.next_batch(cfg.batch_size)
    inputs, targets = hooks.batch(state, place, position, inputs, targets)
    return inputs.to(place.device), targets.to(place.device)


def act_on_guards(
    cfg: Config,
    state: RankState,
    place: Placement,
    writer: CheckpointWriter,
    out: Path,
    verdict: str,
    loss: float,
) -> None:
    """After a step: roll back as its verdict says."""
    if verdict == "skip" and state.events is not None:
        label = f"guard nonfinite: step {state.step} skipped"
        state.events.mark("detect", label, time.time())
    if verdict == "rollback":
        finding = f"{cfg.guards.max_nonfinite} non-finite steps in a row"
        roll_back(cfg, state, writer, out, "nonfinite", finding)
    elif verdict == "spike":
        skip_spike(cfg, state, writer, out, loss, place.world_size)


def run_steps(
    cfg: Config,
    state: RankState,
    place: Placement,
    writer: CheckpointWriter,
    out: Path,
    show_progress: bool,
    hooks: StepHooks,
    evals: MetricsLog | None = None,
) -> float | None:
    """The inner steps (and a fleet's rounds) until the run or the fleet is done; `evals`, the
    main rank's eval.jsonl, gets the evaluations every train.eval_every steps."""
    fleet = state.fleet
    tensorboard = cfg.train.tensorboard
    metrics = MetricsLog(out / "metrics.jsonl", state.step, tensorboard) if place.is_main else None
    total = cfg.train.steps if fleet is None else total_inner_steps(cfg.fleet, cfg.train.steps)
    progress = ProgressDisplay(
        total, state.step, cfg.train.log_every, show_progress and place.is_main
    )
    tokens_per_step = island_tokens_per_step(cfg, place)
    replicas = replica_group(state.model)  # shards differ by design: only replicas compare
    loss = None
    try:
        while state.step < cfg.train.steps if fleet is None else fleet.member.active:
            started, wall = time.perf_counter(), time.time()
            if fleet is not None:
                fleet.training(state.step)
            hooks.before_step(state, place)
            schedule_step = state.step if fleet is None else fleet.schedule_step(state.step)
            loss, grad_norm, verdict = train_step(cfg.train, state, place, schedule_step, hooks)
            act_on_guards(cfg, state, place, writer, out, verdict, loss)
            hooks.after_step(state, place, time.perf_counter() - started)
            every = cfg.guards.digest_every
            if replicas is not None and every and state.step % every == 0:
                guard_digests(state, place, replicas)
            compute_s = time.perf_counter() - started
            stall_s = 0.0
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                stall_s = save_checkpoint(cfg, state, writer)
            step_s = time.perf_counter() - started
            record = {
                "step": state.step,
                "loss": loss,
                "lr": lr_at(schedule_step, cfg.train),
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / step_s,
                "tokens": tokens_per_step,
                "step_s": step_s,
                "compute_s": compute_s,
                "checkpoint_stall_s": stall_s,
                "recovery_s": 0.0,
                "skipped": verdict != "ok",
                "time": wall + step_s,
            }
            if state.events is not None:
                state.events.span("compute", wall, wall + compute_s)
                if not state.startup.written:  # this process's first inner step is done
                    state.startup.mark("first_step", wall + compute_s)
                    append_jsonl(out / STARTUP_FILE, state.startup.record())
                    state.startup.written = True
                if stall_s:
                    state.events.span("checkpoint", wall + compute_s, wall + step_s)
            if fleet is not None:
                record["round"] = fleet.member.round_have + 1
                fleet.stepped(state.step, tokens_per_step, record["tokens_per_s"])
            if metrics is not None:
                metrics.write(record)
            progress.update(record, total)
            final = False
            if fleet is not None and fleet.due(state.step):
                final = fleet.sync(state.step)
                writer.last_saved_step = None  # the round changed the parameters
            if evaluates(state, place) and evaluation_due(
                cfg, state.step, fleet is not None, final
            ):
                evaluate_now(cfg, state, place, evals)
            if final:
                break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    return loss


def island_tokens_per_step(cfg: Config, place: Placement) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len * place.world_size


def evaluation_due(cfg: Config, step: int, in_fleet: bool, final: bool) -> bool:
    """Every train.eval_every steps, but for the last step: the end-of-run evaluation, on
    train.eval_problems problems, follows it anyway."""
    every = cfg.train.eval_every
    last = final if in_fleet else step >= cfg.train.steps
    return bool(every) and step % every == 0 and not last


def evaluates(state: RankState, place: Placement) -> bool:
    """The main rank evaluates; with a sharded model every rank runs the same evaluation in
    step (each forward pass gathers the shards from all of them), and the main rank writes."""
    return place.is_main or is_sharded(state.model)


def evaluate_now(cfg: Config, state: RankState, place: Placement, evals: MetricsLog | None) -> None:
    """An evaluation during training (after the step's round, if it ended one: a fleet island
    then holds the global model): validation loss, and accuracy on
    train.eval_every_problems held-out problems; its time is an `evaluate` span."""
    started = time.time()
    evaluation = evaluate(cfg, state, cfg.train.eval_every_problems)
    if evals is not None:
        append_evaluation(cfg, state, place, evals, evaluation)
    if state.events is not None:
        state.events.span("evaluate", started, time.time())


def append_evaluation(
    cfg: Config, state: RankState, place: Placement, evals: MetricsLog, evaluation: Evaluation
) -> None:
    """One line of eval.jsonl: after the current step, with the tokens the island trained on."""
    evals.write(
        {
            "step": state.step,
            "tokens": state.step * island_tokens_per_step(cfg, place),
            "val_loss": evaluation.val_loss,
            "accuracy": evaluation.accuracy,
            "time": time.time(),
        }
    )


def save_checkpoint(cfg: Config, state: RankState, writer: CheckpointWriter) -> float:
    if writer.last_saved_step == state.step:
        return 0.0
    meta: dict[str, Any] = {
        "parts": list(state.checkpoint_tensors()),
        "config": cfg.to_dict(),
        "data": state.stream.state_dict(),
        "rng": rng_state(),
        "train_state": {"step": state.step},
        "guards": {"spike": state.spike_guard.state_dict()},
        "versions": hardware.stack_versions(),
    }
    if state.fleet is not None:
        meta["fleet"] = {"round_have": state.fleet.member.round_have}
    tokenizer_json = state.tokenizer.to_str().encode()
    tensors = state.checkpoint_tensors()
    state.saved_at = time.time()
    return writer.save(state.step, tensors, meta, {TOKENIZER_FILE: tokenizer_json})


def evaluate(cfg: Config, state: RankState, problems: int | None = None) -> Evaluation:
    """Validation loss and accuracy on held-out problems (train.eval_problems by default); the
    model goes back to training mode after."""
    model = state.model
    model.eval()
    if state.validation_tokens is None:  # tokenized once: evaluations during training reuse it
        state.validation_tokens = tokenize(state.tokenizer, state.documents.validation)
    count = cfg.train.eval_problems if problems is None else problems
    acc, samples = accuracy(
        model, state.tokenizer, state.documents.heldout[:count], cfg.train.samples
    )
    loss = validation_loss(model, state.validation_tokens, cfg.data.seq_len)
    model.train()
    return Evaluation(loss, acc, samples)
