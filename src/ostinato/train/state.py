"""One rank's training state, and how it is built: tokenizer, data, model, optimizer, guards,
the checkpoint it resumes from, and, in a fleet, the island's place in it."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from ostinato.checkpoint.reader import resolve_checkpoint
from ostinato.checkpoint.state import init_optimizer_state, restore, tensor_state
from ostinato.checkpoint.store import MARKER, CheckpointError, load_tensors, read_meta
from ostinato.config import Config, TrainConfig, from_dict
from ostinato.data.cache import cached_tokens
from ostinato.data.sources import Documents, load_documents
from ostinato.data.stream import TokenStream
from ostinato.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from ostinato.fleet.island import FleetIsland, fingerprint, island_seed
from ostinato.fleet.member import FleetMember
from ostinato.hardware import Placement
from ostinato.model.llama import Llama
from ostinato.startup import StartupClock
from ostinato.train.guards import LossSpikeGuard, NonFiniteGuard
from ostinato.train.metrics import EventLog
from ostinato.train.parallel import build_model, replicate, strategy_of

log = logging.getLogger("ostinato")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class RankState:
    """Everything that changes during training, for one rank."""

    model: Llama  # the bare model: checkpoints and evaluation use it
    step_model: torch.nn.Module  # what the step runs: DDP and/or compiled
    optimizer: torch.optim.Optimizer
    stream: TokenStream
    tokenizer: Tokenizer
    documents: Documents
    guard: NonFiniteGuard
    spike_guard: LossSpikeGuard
    step: int = 0
    fleet: FleetIsland | None = None  # set when this rank's island is part of a fleet
    events: EventLog | None = None  # the main rank's
    saved_at: float = field(default_factory=time.time)  # when the newest good state was saved
    startup: StartupClock = field(default_factory=StartupClock)  # where the start's time went
    validation_tokens: torch.Tensor | None = None  # tokenized at the first evaluation
    strategy: str = "single"  # how the island's ranks share the model (train/parallel.py)
    gradient_bytes: int = 0  # this rank's gradients, measured at the first step

    def checkpoint_tensors(self) -> dict[str, Any]:
        tensors = tensor_state(self.model, self.optimizer)
        if self.fleet is not None:
            tensors["outer_optimizer"] = self.fleet.tensor_state()
        return tensors

    def restore_guards(self, meta: dict[str, Any]) -> None:
        """Guard state as of a checkpoint; one saved before guards kept state starts empty."""
        self.spike_guard.load_state_dict(meta.get("guards", {}).get("spike", {"losses": []}))


def build_state(
    cfg: Config,
    out: Path,
    place: Placement,
    resume_from: Path | None,
    resume: str = "auto",
    clock: StartupClock | None = None,
) -> RankState:
    """The rank's state, resumed from `resume_from` (or, in a fleet, from the fleet's own
    checkpoint unless `resume` is none), joined to its fleet, wrapped for data parallelism."""
    clock = StartupClock() if clock is None else clock
    documents = load_documents(cfg.data)
    warm = warm_start_checkpoint(cfg)
    tokenizer = prepare_tokenizer(cfg, documents, out, place, resume_from, warm)
    check_vocab(tokenizer, cfg.model.vocab_size, str(out / TOKENIZER_FILE))
    stream = TokenStream(
        cached_tokens(tokenizer, documents.train, out / "cache"),
        cfg.data.seq_len,
        island_seed(cfg.fleet, cfg.data.seed),
        place.rank,
        place.world_size,
    )
    clock.mark("data")
    strategy = strategy_of(cfg.parallel, place.world_size, in_fleet=bool(cfg.fleet.coordinator))
    model = build_model(cfg.parallel, cfg.model, cfg.train.seed, place, strategy)
    if warm is not None and resume_from is None:
        start_from(model, cfg, warm)
    optimizer = make_optimizer(model, cfg.train)
    init_optimizer_state(model, optimizer)
    guards = NonFiniteGuard(cfg.guards), LossSpikeGuard(cfg.guards)
    state = RankState(model, model, optimizer, stream, tokenizer, documents, *guards)
    state.startup, state.strategy = clock, strategy
    clock.mark("model")
    if cfg.fleet.coordinator:
        started = checkpoint_id(warm) if warm is not None else ""
        prints = fingerprint(cfg.model, cfg.fleet, cfg.train.steps, tokenizer, started)
        # each rank holds its own fleet shards (fleet/shards.py), taken from the model
        member = FleetMember(cfg.fleet, model, prints, cfg.guards, place.rank, place.world_size)
        sections = cfg.fleet, cfg.checkpoint, cfg.train.steps
        state.fleet = FleetIsland(*sections, member, model, stream, place, out, cfg.to_dict())
    if resume_from is not None:
        resume_state(cfg, state, resume_from)
    elif state.fleet is not None and resume != "none":
        state.fleet.resume_from_fleet_checkpoint()
    clock.mark("checkpoint")
    if state.fleet is not None:
        state.fleet.join()  # the leader joins; the island's other ranks follow it
        if state.fleet.member.joined_at is not None:
            clock.mark("join", state.fleet.member.joined_at)
        clock.mark("heal")
    state.step_model = replicate(model, place, strategy)
    if cfg.train.compile:
        state.step_model = torch.compile(state.step_model)
    return state


def resume_state(cfg: Config, state: RankState, resume_from: Path) -> None:
    """Parameters, optimizer, data position, step, guards and fleet round of a checkpoint."""
    meta = restore(resume_from, state.checkpoint_tensors(), cfg.to_dict())
    if meta.get("data"):
        state.stream.load_state_dict(meta["data"])
    state.step = meta["train_state"]["step"]
    state.restore_guards(meta)
    if state.fleet is not None and "fleet" in meta:
        state.fleet.member.round_have = meta["fleet"]["round_have"]
    log.info("resumed from %s at step %d", resume_from, state.step)


def warm_start_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint a fleet island starts from (fleet.warm_start: a run directory means its
    newest good one), verified by its checksums; None without a warm start."""
    if not (cfg.fleet.coordinator and cfg.fleet.warm_start):
        return None
    try:
        return resolve_checkpoint(cfg.fleet.warm_start)
    except CheckpointError as exc:
        raise ValueError(f"fleet.warm_start: {exc}") from None


def checkpoint_id(checkpoint: Path) -> str:
    """What names a checkpoint's contents: its COMMITTED marker holds the sha256 of its
    manifest, which holds every file's. Read on every start, restarts too, so it is cheap."""
    return (checkpoint / MARKER).read_text().strip()[:16]


def start_from(model: Llama, cfg: Config, checkpoint: Path) -> None:
    """The warm start's parameters, into a model of the same shape (else a ValueError that
    names the fields that differ). DCP reads each rank's own rows of a sharded model (every rank
    calls), so no rank holds the whole of it."""
    theirs_cfg = from_dict(read_meta(checkpoint)["config"]).model
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(theirs_cfg)
    differing = [
        f"model.{k} {theirs[k]} (ours {ours[k]})" for k in ours if ours[k] != theirs.get(k)
    ]
    if differing:
        raise ValueError(f"fleet.warm_start {checkpoint} has another model: {', '.join(differing)}")
    load_tensors(checkpoint, {"model": model.state_dict()})
    log.info("warm start: every island starts from %s", checkpoint)


def prepare_tokenizer(
    cfg: Config,
    documents: Documents,
    out: Path,
    place: Placement,
    resume_from: Path | None,
    warm: Path | None = None,
) -> Tokenizer:
    """The checkpoint's tokenizer on resume; else the configured one; else the warm start's;
    else train one (rank 0)."""
    target = out / TOKENIZER_FILE
    configured = cfg.data.tokenizer or (str(warm / TOKENIZER_FILE) if warm is not None else "")
    source = resume_from / TOKENIZER_FILE if resume_from else Path(configured or target)
    if place.is_main:
        if resume_from is None and not configured:
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
