"""The island trainer: synchronous data-parallel training of one model on one island.

Reads top to bottom: set up the placement, resolve the resume point, build tokenizer, data,
model and optimizer, restore the checkpoint, run the inner steps, save, evaluate.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch.nn.parallel import DistributedDataParallel

from ostinato import hardware
from ostinato.checkpoint.state import (
    find_resume_point,
    init_optimizer_state,
    parameter_digest,
    restore,
    rng_state,
    tensor_state,
)
from ostinato.checkpoint.store import CheckpointWriter
from ostinato.config import Config, TrainConfig, save_config
from ostinato.data.sources import Documents, load_documents
from ostinato.data.stream import TokenStream, tokenize
from ostinato.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from ostinato.goodput import Goodput, summarize
from ostinato.faults.inject import Injector
from ostinato.faults.poison import DataPoison
from ostinato.fleet import island as fleet_island
from ostinato.fleet.member import FleetMember
from ostinato.hardware import Placement
from ostinato.model.llama import Llama
from ostinato.train.evaluate import Evaluation, accuracy, validation_loss
from ostinato.train.guards import (
    LossSpikeGuard,
    NonFiniteGuard,
    guard_digests,
    restore_guards,
    roll_back,
    skip_spike,
)
from ostinato.train.injection import inject_bitflip, inject_faults, strike_due_faults
from ostinato.train.metrics import EventLog, MetricsLog, ProgressDisplay
from ostinato.train.schedule import lr_at

log = logging.getLogger("ostinato")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float | None
    parameter_digest: str  # of this rank's final parameters
    evaluation: Evaluation = field(default_factory=Evaluation)
    goodput: Goodput | None = None  # where this run's wall-clock time went (rank 0)


@dataclass
class Island:
    """Everything that changes during training, for one rank."""

    model: Llama  # the bare model: checkpoints and evaluation use it
    step_model: torch.nn.Module  # what the step runs: DDP and/or compiled
    optimizer: torch.optim.Optimizer
    stream: TokenStream
    tokenizer: Tokenizer
    documents: Documents
    step: int = 0
    member: FleetMember | None = None  # set when this island is part of a fleet
    fleet_group: dist.ProcessGroup | None = None  # the island's ranks, gloo: fleet state
    fleet_writer: CheckpointWriter | None = None  # fleet checkpoints this island writes
    events: EventLog | None = None
    guard: NonFiniteGuard | None = None
    spike_guard: LossSpikeGuard | None = None
    injector: Injector | None = None  # strikes the scheduled faults (main rank)
    bitflip_steps: frozenset[int] = frozenset()  # steps after which the `bitflip` fault strikes
    poison: DataPoison | None = None  # data the `spike` fault replaces with random tokens
    saved_at: float = field(default_factory=time.time)  # when the newest good state was saved

    def checkpoint_tensors(self) -> dict[str, Any]:
        tensors = tensor_state(self.model, self.optimizer)
        if self.member is not None:
            tensors["outer_optimizer"] = fleet_island.tensor_state(self.member)
        return tensors


def train(cfg: Config, out: Path, resume: str = "auto", show_progress: bool = True) -> TrainResult:
    """Train per `cfg` into run directory `out`, resuming per `resume` (auto, none or a path)."""
    place = hardware.setup(cfg.hardware)
    try:
        return _train(cfg, Path(out), resume, place, show_progress)
    finally:
        hardware.teardown()


def _train(
    cfg: Config, out: Path, resume: str, place: Placement, show_progress: bool
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
    island = build_island(cfg, out, place, resume_from, resume)
    # Joining a fleet may have healed the parameters since the checkpoint resumed from.
    resumed_as_saved = resume_from is not None and island.member is None
    writer.last_saved_step = island.step if resumed_as_saved else None
    if place.is_main:
        island.events = EventLog(out / "events.jsonl", cfg.fleet.island)
        rejoined = island.member is not None and island.member.round_have > 0
        if resume_from or rejoined:  # a fresh start is not recovery; a restart is
            island.events.span("recovery", recovery_started, time.time())
    try:
        final_loss = run_steps(cfg, island, place, writer, out, show_progress)
    finally:
        if island.fleet_writer is not None:
            island.fleet_writer.wait()
        if island.member is not None:
            island.member.close()
    save_checkpoint(cfg, island, writer)
    writer.wait()
    if dist.is_initialized():
        dist.barrier()
    evaluation = evaluate(cfg, island) if place.is_main else Evaluation()
    goodput = summarize(out, f"run {out.name}") if place.is_main else None
    digest = parameter_digest(island.model)
    return TrainResult(out, island.step, final_loss, digest, evaluation, goodput)


def build_island(
    cfg: Config, out: Path, place: Placement, resume_from: Path | None, resume: str = "auto"
) -> Island:
    documents = load_documents(cfg.data)
    tokenizer = prepare_tokenizer(cfg, documents, out, place, resume_from)
    check_vocab(tokenizer, cfg.model.vocab_size, str(out / TOKENIZER_FILE))
    stream = TokenStream(
        tokenize(tokenizer, documents.train),
        cfg.data.seq_len,
        fleet_island.island_seed(cfg),
        place.rank,
        place.world_size,
    )
    model = Llama(cfg.model)
    model.init_weights(torch.Generator().manual_seed(cfg.train.seed))
    model.to(place.device)
    optimizer = make_optimizer(model, cfg.train)
    init_optimizer_state(model, optimizer)
    island = Island(model, model, optimizer, stream, tokenizer, documents)
    island.guard = NonFiniteGuard(cfg.guards)
    island.spike_guard = LossSpikeGuard(cfg.guards)
    inject_faults(cfg, island, place, out)
    if cfg.fleet.coordinator:
        fingerprint = fleet_island.fingerprint(cfg, tokenizer)
        island.member = FleetMember(cfg.fleet, model, fingerprint, cfg.guards)
        if place.world_size > 1:
            island.fleet_group = dist.new_group(backend="gloo")
    if resume_from is not None:
        meta = restore(resume_from, island.checkpoint_tensors(), cfg.to_dict())
        if meta.get("data"):
            stream.load_state_dict(meta["data"])
        island.step = meta["train_state"]["step"]
        restore_guards(island, meta)
        if island.member is not None and "fleet" in meta:
            island.member.round_have = meta["fleet"]["round_have"]
        log.info("resumed from %s at step %d", resume_from, island.step)
    elif island.member is not None and resume != "none":
        fleet_island.resume_from_fleet_checkpoint(cfg, out, island.member, model, stream)
    if island.member is not None and place.is_main:
        fleet_island.join(cfg, out, island.member, model, stream)
    if island.member is not None and place.world_size > 1:
        fleet_island.share_fleet_state(island)  # the leader may have been healed, or finished
    if place.world_size > 1:
        device_ids = [place.device.index] if place.is_accelerator else None
        island.step_model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.train.compile:
        island.step_model = torch.compile(island.step_model)
    return island


def prepare_tokenizer(
    cfg: Config, documents: Documents, out: Path, place: Placement, resume_from: Path | None
) -> Tokenizer:
    """The checkpoint's tokenizer on resume; else the configured one; else train one (rank 0)."""
    target = out / TOKENIZER_FILE
    source = resume_from / TOKENIZER_FILE if resume_from else Path(cfg.data.tokenizer or target)
    if place.is_main:
        if resume_from is None and not cfg.data.tokenizer:
            log.info("training a byte-level BPE tokenizer (%d tokens)", cfg.model.vocab_size)
            train_tokenizer(documents.train, cfg.model.vocab_size).save(str(target))
        elif source.resolve() != target.resolve():
            load_tokenizer(source)  # refuse a malformed file before copying it into the run
            shutil.copyfile(source, target)
    if dist.is_initialized():
        dist.barrier()
    return load_tokenizer(target)


def make_optimizer(model: Llama, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def autocast_dtype(cfg: TrainConfig, place: Placement) -> torch.dtype | None:
    wanted = cfg.dtype if cfg.dtype != "auto" else ("bf16" if place.is_accelerator else "fp32")
    return torch.bfloat16 if wanted == "bf16" else None


def train_step(
    cfg: TrainConfig,
    island: Island,
    place: Placement,
    poison: bool,
    schedule_step: int,
) -> tuple[float, float, str]:
    """One optimizer step with gradient accumulation: (mean loss, gradient norm, guard verdict).

    The step is applied only if the non-finite guard lets it through; `poison` injects a NaN
    into the loss (the `nan` fault) to prove that it does not. The learning rate is the
    schedule's at `schedule_step` (fleet/island.py: schedule_step).
    """
    lr = lr_at(schedule_step, cfg)
    for group in island.optimizer.param_groups:
        group["lr"] = lr
    dtype = autocast_dtype(cfg, place)
    loss_sum = torch.zeros((), device=place.device)
    for micro in range(cfg.grad_accum):
        inputs, targets = next_batch(cfg, island, place)
        last = micro == cfg.grad_accum - 1
        sync = (
            contextlib.nullcontext()
            if last or place.world_size == 1
            else island.step_model.no_sync()
        )
        autocast = torch.autocast(place.device.type, dtype=dtype, enabled=dtype is not None)
        with sync, autocast:
            loss = island.step_model(inputs, targets) / cfg.grad_accum
            if poison:
                loss = loss * float("nan")
        loss.backward()
        loss_sum += loss.detach()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(island.model.parameters(), max_norm))
    if place.world_size > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= place.world_size
    island.step += 1
    verdict = island.guard.verdict(island.step, float(loss_sum), grad_norm)
    if verdict == "ok":
        verdict = island.spike_guard.verdict(float(loss_sum))
    if verdict == "ok":
        island.optimizer.step()
    island.optimizer.zero_grad(set_to_none=True)
    return float(loss_sum), grad_norm, verdict


def next_batch(
    cfg: TrainConfig, island: Island, place: Placement
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's next micro-batch, on the device; random tokens where the `spike` fault poisons."""
    position = island.stream.consumed
    inputs, targets = island.stream.next_batch(cfg.batch_size)
    if island.poison is not None and island.poison.covers(position):
        inputs, targets = island.poison.batch(
            position, place.rank, cfg.batch_size, island.stream.seq_len
        )
    return inputs.to(place.device), targets.to(place.device)


def act_on_guards(
    cfg: Config,
    island: Island,
    place: Placement,
    writer: CheckpointWriter,
    out: Path,
    verdict: str,
    loss: float,
) -> None:
    """After a step: roll back as its verdict says, flip a scheduled bit, compare the ranks."""
    if verdict == "skip" and island.events is not None:
        label = f"guard nonfinite: step {island.step} skipped"
        island.events.mark("detect", label, time.time())
    if verdict == "rollback":
        finding = f"{cfg.guards.max_nonfinite} non-finite steps in a row"
        roll_back(cfg, island, writer, out, "nonfinite", finding)
    elif verdict == "spike":
        skip_spike(cfg, island, writer, out, loss, place.world_size)
    if island.step in island.bitflip_steps:
        inject_bitflip(cfg, island, place)
    every = cfg.guards.digest_every
    if place.world_size > 1 and every and island.step % every == 0:
        guard_digests(island, place)


def run_steps(
    cfg: Config,
    island: Island,
    place: Placement,
    writer: CheckpointWriter,
    out: Path,
    show_progress: bool,
) -> float | None:
    metrics = MetricsLog(out / "metrics.jsonl", island.step) if place.is_main else None
    total = cfg.train.steps if island.member is None else fleet_island.total_inner_steps(cfg)
    progress = ProgressDisplay(
        total, island.step, cfg.train.log_every, show_progress and place.is_main
    )
    tokens_per_step = (
        cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len * place.world_size
    )
    rounds = fleet_island.RoundClock()
    loss = None
    try:
        while island.step < cfg.train.steps if island.member is None else island.member.active:
            started, wall = time.perf_counter(), time.time()
            poison = strike_due_faults(island)
            schedule_step = fleet_island.schedule_step(cfg, island, rounds)
            loss, grad_norm, verdict = train_step(cfg.train, island, place, poison, schedule_step)
            act_on_guards(cfg, island, place, writer, out, verdict, loss)
            compute_s = time.perf_counter() - started
            slowdown = island.injector.slowdown if island.injector else cfg.fleet.slowdown
            if slowdown > 1:  # emulate a slower island: its compute takes longer
                time.sleep((slowdown - 1) * compute_s)
                compute_s = time.perf_counter() - started
            stall_s = 0.0
            if cfg.checkpoint.every and island.step % cfg.checkpoint.every == 0:
                stall_s = save_checkpoint(cfg, island, writer)
            step_s = time.perf_counter() - started
            record = {
                "step": island.step,
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
            }
            if island.events is not None:
                island.events.span("compute", wall, wall + compute_s)
                if stall_s:
                    island.events.span("checkpoint", wall + compute_s, wall + step_s)
            if island.member is not None:
                record["round"] = island.member.round_have + 1
                rounds.add(tokens_per_step)
                island.member.heartbeat.status.update(
                    step=island.step, tokens_per_s=record["tokens_per_s"], state="training"
                )
            if metrics is not None:
                metrics.write(record)
            progress.update(record, total)
            if island.member is not None and fleet_island.fleet_due(cfg, island, rounds):
                final = fleet_island.sync_round(cfg, island, place, out, rounds)
                writer.last_saved_step = None  # the round changed the parameters
                if final:
                    break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    return loss


def save_checkpoint(cfg: Config, island: Island, writer: CheckpointWriter) -> float:
    if writer.last_saved_step == island.step:
        return 0.0
    meta: dict[str, Any] = {
        "parts": list(island.checkpoint_tensors()),
        "config": cfg.to_dict(),
        "data": island.stream.state_dict(),
        "rng": rng_state(),
        "train_state": {"step": island.step},
        "guards": {"spike": island.spike_guard.state_dict()},
        "versions": hardware.stack_versions(),
    }
    if island.member is not None:
        meta["fleet"] = {"round_have": island.member.round_have}
    tokenizer_json = island.tokenizer.to_str().encode()
    tensors = island.checkpoint_tensors()
    island.saved_at = time.time()
    return writer.save(island.step, tensors, meta, {TOKENIZER_FILE: tokenizer_json})


def evaluate(cfg: Config, island: Island) -> Evaluation:
    model = island.model
    model.eval()
    val_tokens = tokenize(island.tokenizer, island.documents.validation)
    problems = island.documents.heldout[: cfg.train.eval_problems]
    acc, samples = accuracy(model, island.tokenizer, problems, cfg.train.samples)
    return Evaluation(validation_loss(model, val_tokens, cfg.data.seq_len), acc, samples)
