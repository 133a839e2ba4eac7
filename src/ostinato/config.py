"""Configuration: nested dataclasses loaded from TOML, with `--section.key=value` overrides.

Each component receives only its own section (`cfg.model`, `cfg.data`, ...). Validation collects
every problem and raises one `ConfigError` that names each bad field and what it allows.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ostinato.rl.config import RLConfig
from ostinato.schema import apply_override, build_sections, option, to_toml


class ConfigError(ValueError):
    """A user error in a config file or an override: the message names every bad field."""


# Model sizes: head size stays in the set vLLM's CPU attention accepts (32, 64, 128, ...).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=192, vocab_size=512),
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=1024),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=8192),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=32768),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256),
}


@dataclass
class ModelConfig:
    size: str = option(
        "tiny", "preset that fills every dimension not set here", choices=MODEL_SIZES
    )
    vocab_size: int = option(0, "tokens in the embedding table (0: from the size preset)", ge=0)
    dim: int = option(0, "hidden size (0: from the size preset)", ge=0)
    n_layers: int = option(0, "decoder layers (0: from the size preset)", ge=0)
    n_heads: int = option(0, "query heads (0: from the size preset)", ge=0)
    n_kv_heads: int = option(0, "key/value heads, grouped-query attention (0: preset)", ge=0)
    ffn_dim: int = option(0, "SwiGLU intermediate size (0: from the size preset)", ge=0)
    max_seq_len: int = option(256, "longest sequence the model is trained and served on", ge=8)
    rope_theta: float = option(10000.0, "RoPE base frequency", ge=1.0)
    norm_eps: float = option(1e-5, "RMSNorm epsilon", ge=0.0)
    tie_embeddings: bool = option(False, "share the input embedding with the output head")
    init_std: float = option(0.02, "std of the normal initialisation", ge=0.0)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class DataConfig:
    source: str = option(
        "reasoning",
        "reasoning: built-in worked problems; files: local text/JSONL/Parquet; stdlib: Python's own source",
        choices=("reasoning", "files", "stdlib"),
    )
    path: str = option("", "file or directory for source = files")
    text_field: str = option("text", "field that holds the text in JSONL and Parquet rows")
    tokenizer: str = option(
        "", "tokenizer.json to use; empty: train a byte-level BPE on the corpus"
    )
    seq_len: int = option(128, "tokens per training sequence", ge=8)
    seed: int = option(1234, "seed of the corpus generator and the shuffling order")
    problems: int = option(20000, "training problems generated for source = reasoning", ge=1)
    heldout: int = option(200, "held-out problems for the accuracy metric", ge=0)
    max_bytes: int = option(20_000_000, "cap on the corpus text read from files or stdlib", ge=1)


@dataclass
class TrainConfig:
    steps: int = option(100, "inner optimizer steps", ge=1)
    batch_size: int = option(8, "sequences per rank per micro-batch", ge=1)
    grad_accum: int = option(1, "micro-batches accumulated per step", ge=1)
    lr: float = option(3e-3, "peak learning rate", ge=0.0)
    min_lr_ratio: float = option(
        0.1, "final learning rate as a fraction of the peak", ge=0.0, le=1.0
    )
    warmup_steps: int = option(10, "linear warm-up steps before the cosine decay", ge=0)
    weight_decay: float = option(0.1, "AdamW weight decay", ge=0.0)
    beta1: float = option(0.9, "AdamW beta1", ge=0.0, le=1.0)
    beta2: float = option(0.95, "AdamW beta2", ge=0.0, le=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", ge=0.0)
    seed: int = option(0, "seed of the model initialisation")
    dtype: str = option(
        "auto",
        "autocast dtype (auto: bf16 on accelerators, fp32 on CPU)",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = option(False, "wrap the model in torch.compile")
    threads: int = option(0, "CPU threads per rank (0: torch's default)", ge=0)
    log_every: int = option(10, "steps between plain progress lines when not on a terminal", ge=1)
    eval_problems: int = option(50, "held-out problems answered at the end for the accuracy", ge=0)
    samples: int = option(3, "sample answers printed at the end", ge=0)
    eval_every: int = option(
        0, "steps between evaluations during training, into eval.jsonl (0: at the end only)", ge=0
    )
    eval_every_problems: int = option(
        20, "held-out problems answered at each of those evaluations (0: loss only)", ge=0
    )
    tensorboard: bool = option(
        False, "also write metrics for TensorBoard into RUN_DIR/tensorboard (the extra)"
    )


@dataclass
class CheckpointConfig:
    every: int = option(50, "steps between checkpoints (0: only at the end)", ge=0)
    keep: int = option(3, "checkpoints kept; older ones are deleted", ge=1)
    async_save: bool = option(True, "write checkpoints in a background thread")


@dataclass
class HardwareConfig:
    device: str = option("auto", "where ranks run", choices=("auto", "cpu", "cuda", "npu", "mps"))
    backend: str = option("auto", "collective backend", choices=("auto", "gloo", "nccl", "hccl"))
    timeout_s: float = option(300.0, "timeout of one collective inside an island", ge=1.0)


@dataclass
class ParallelConfig:
    """How the ranks of one island share the model (train/parallel.py)."""

    strategy: str = option(
        "auto",
        "with more than one rank: fsdp shards parameters, gradients and optimizer state "
        "(FSDP2); ddp keeps a full copy on every rank; auto: fsdp, but ddp for a fleet island",
        choices=("auto", "fsdp", "ddp"),
    )
    replicate: int = option(
        1, "fsdp: replicas of the shards (HSDP; the ranks must divide by it); 1: plain FSDP", ge=1
    )
    activation_checkpointing: str = option(
        "none",
        "recompute activations in the backward pass: every decoder layer (full), every other "
        "one (selective), or none",
        choices=("none", "full", "selective"),
    )
    reshard_after_forward: str = option(
        "default",
        "fsdp: free each decoder layer's gathered parameters after its forward pass and gather "
        "them again for its backward (always), keep them gathered until then (never: no second "
        "all-gather, a whole model's worth of compute-precision parameters held through the "
        "step), or always but the last layer, whose backward comes next (default)",
        choices=("default", "always", "never"),
    )


@dataclass
class FleetConfig:
    coordinator: str = option(
        "", "HOST:PORT of the fleet coordinator; empty: train one island alone"
    )
    island: str = option("a", "this island's name, unique in the fleet")
    token: str = option("", "the fleet's shared secret (or OSTINATO_FLEET_TOKEN)")
    budget: str = option("steps:20", "inner work per round: steps:H or seconds:T")
    rounds: int = option(0, "rounds in the run (0: train.steps / H)", ge=0)
    compression: str = option(
        "int8", "pseudo-gradients on the wire", choices=("fp32", "bf16", "int8", "int4")
    )
    block: int = option(128, "values per quantization block (one fp32 scale each)", ge=2)
    outer_lr: float | str = option(
        "auto",
        "outer Nesterov SGD learning rate; auto: from the number of islands "
        "(fleet/outer.py: outer_lr_of)",
        ge=0.0,
        words=("auto",),
    )
    outer_momentum: float = option(0.9, "outer Nesterov momentum (DiLoCo: 0.9)", ge=0.0, le=1.0)
    expect: int = option(
        0, "islands to wait for before the first round (0: whoever is there)", ge=0
    )
    min_islands: int = option(
        1, "fewest islands that may commit a round after the grace window", ge=1
    )
    grace_s: float = option(
        5.0, "how long ready islands wait for the others before a partial round", ge=0.0
    )
    timeout_s: float = option(
        20.0, "timeout of one cross-island collective, beyond its payload's transfer time", ge=0.5
    )
    link_floor_mbit_s: float = option(
        100.0,
        "slowest link an island is assumed to have, Mbit/s: an exchange or heal may take its "
        "payload's bytes at this rate (or at half the rate measured, if slower) on top of "
        "fleet.timeout_s",
        gt=0.0,
    )
    heartbeat_s: float = option(0.5, "seconds between heartbeats", ge=0.05)
    heartbeat_timeout_s: float = option(5.0, "silence after which an island counts as gone", ge=0.2)
    progress_timeout_s: float = option(
        30.0,
        "training without finishing an inner step for this long, while heartbeats go on, counts "
        "an island as stalled (> heartbeat_timeout_s; longer than the slowest step)",
        ge=0.5,
    )
    connect_timeout_s: float = option(60.0, "how long to wait for the coordinator", ge=0.5)
    checkpoint_every: int = option(5, "rounds between durable fleet checkpoints (0: never)", ge=0)
    checkpoint_dir: str = option(
        "", "where fleet checkpoints go (default: next to the island's run)"
    )
    fragments: int = option(
        1,
        "Streaming DiLoCo: parameter fragments P, each synchronised every H steps at staggered "
        "times, a round every H/P steps carrying ~1/P of the parameters (1: plain DiLoCo)",
        ge=1,
    )
    overlap: int = option(
        0,
        "inner steps a round's exchange runs in the background before its result is merged "
        "(tau of Streaming DiLoCo; < H / fragments; 0: wait for it)",
        ge=0,
    )
    mix: float = option(
        0.5,
        "with overlap: the merge keeps this share of the local parameters, "
        "local = mix * local + (1 - mix) * global (alpha of Streaming DiLoCo)",
        ge=0.0,
        le=1.0,
    )
    warm_start: str = option(
        "",
        "a run directory or checkpoint of `ostinato train` (same model) that every island "
        "starts from, with its tokenizer, instead of the seeded init (DiLoCo's warm start)",
    )
    shards: int = option(
        1,
        "fleet shards: the fleet state (global parameters, outer momentum, residual) cut into "
        "this many ranges, the same for every island; rank r of an island of N ranks holds and "
        "exchanges the shards k with k % N == r (fleet local --ranks sets the largest island's N)",
        ge=1,
    )
    warm_start_steps: int = option(
        0,
        "the run's first N inner steps are trained synchronously across the islands (a round "
        "after every step, fp32, the islands' parameters averaged) before DiLoCo's rounds begin "
        "(DiLoCo's warm start, inside the fleet; counts in train.steps; needs a step budget)",
        ge=0,
    )


@dataclass
class GuardsConfig:
    fleet_digest: bool = option(
        True, "after each round, quarantine and heal an island whose global digest is the odd one"
    )
    outlier_ratio: float = option(
        10.0,
        "leave out a pseudo-gradient whose norm is this many times the others' (0: off)",
        ge=0.0,
    )
    straggler_ratio: float = option(
        1.5, "report an island this many times slower than the others' median (0: off)", ge=0.0
    )
    link_ratio: float = option(
        3.0, "report an island whose exchange takes this many times the others' (0: off)", ge=0.0
    )
    nonfinite: bool = option(True, "skip a step whose loss or gradient norm is NaN or infinite")
    max_nonfinite: int = option(
        3, "skipped steps in a row before rolling back to the last checkpoint", ge=1
    )
    spike: bool = option(
        True, "roll back and skip the data that follows a loss far above the recent median"
    )
    spike_window: int = option(50, "recent applied steps whose losses judge a spike", ge=2)
    spike_z: float = option(
        6.0, "robust z-score (median and MAD of the window) above which a loss spikes", gt=0.0
    )
    spike_warmup: int = option(20, "losses in the window before spikes are judged", ge=2)
    spike_skip: int = option(20, "steps' worth of data skipped after a spike", ge=0)
    digest_every: int = option(
        100, "inner steps between parameter digest checks across an island's ranks (0: off)", ge=0
    )


@dataclass
class FaultsConfig:
    schedule: str = option(
        "", "faults injected into this run, e.g. nan@step=70 (see ostinato.faults.spec)"
    )
    islands: str = option(
        "", "the fleet's island names, comma-separated, set by `ostinato chaos` (empty: this one)"
    )
    start: float = option(
        0.0, "unix time the chaos run started; storm faults strike at seconds after it", ge=0.0
    )


@dataclass
class ServeConfig:
    """Bounds of `ostinato serve`'s HTTP API; the command's options of the same names default
    from here. Not a section of training recipes: a server reads no recipe."""

    max_body_bytes: int = option(
        1 << 20, "largest request body accepted, in bytes; a larger one gets 413 unparsed", ge=1
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "hardware": HardwareConfig,
    "parallel": ParallelConfig,
    "fleet": FleetConfig,
    "guards": GuardsConfig,
    "faults": FaultsConfig,
    "rl": RLConfig,
}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML recipe, apply `section.key=value` overrides, validate and resolve presets."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    errors: list[str] = []
    for item in overrides:
        apply_override(raw, item, errors)
    cfg = from_dict(raw, errors)
    resolve_model(cfg.model, errors)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        errors.append(
            f"data.seq_len = {cfg.data.seq_len}: must be <= model.max_seq_len ({cfg.model.max_seq_len})"
        )
    _check_budget(cfg.fleet, errors)
    if cfg.fleet.warm_start_steps and cfg.fleet.warm_start_steps >= cfg.train.steps:
        errors.append(
            f"fleet.warm_start_steps = {cfg.fleet.warm_start_steps}: must be < train.steps "
            f"({cfg.train.steps}), or no DiLoCo round would follow the warm start"
        )
    _check_timeout_order(cfg.fleet, errors)
    if cfg.guards.spike_warmup > cfg.guards.spike_window:
        errors.append(
            f"guards.spike_warmup = {cfg.guards.spike_warmup}: must be <= guards.spike_window "
            f"({cfg.guards.spike_window}), or the window never holds enough losses"
        )
    if cfg.fleet.block % 2:
        errors.append(
            f"fleet.block = {cfg.fleet.block}: must be even (4-bit values are packed in pairs)"
        )
    if errors:
        raise ConfigError(_format_errors(path, errors))
    return cfg


EXCHANGE_MARGIN_S = 5.0  # after the collective's timeout: members report, emulated links pad


def exchange_deadline_s(fleet: FleetConfig) -> float:
    """How long the coordinator lets an exchange run before it aborts it, before the payload's
    transfer time (fleet/deadlines.py adds it): past the collective's own timeout, so a member's
    gloo error is reported first."""
    return fleet.timeout_s + EXCHANGE_MARGIN_S


def _check_timeout_order(fleet: FleetConfig, errors: list[str]) -> None:
    """The fleet's timeouts fire in one order, each above the one under it: heartbeat (a silent
    island; a dead one is known sooner, from its connection) < progress (one that beats but makes
    no step), and collective (fleet.timeout_s) < exchange deadline (collective + 5 s) < progress,
    so an exchange that runs long is never taken for a stall. fleet.connect_timeout_s (join)
    bounds the wait for the coordinator itself."""
    progress = fleet.progress_timeout_s
    if progress <= fleet.heartbeat_timeout_s:
        errors.append(
            f"fleet.progress_timeout_s = {progress}: must be > fleet.heartbeat_timeout_s "
            f"({fleet.heartbeat_timeout_s}), so a silent island is caught by its heartbeats, not "
            f"taken for a stalled one"
        )
    if progress <= exchange_deadline_s(fleet):
        errors.append(
            f"fleet.progress_timeout_s = {progress}: must be > fleet.timeout_s + "
            f"{EXCHANGE_MARGIN_S:g} ({exchange_deadline_s(fleet):g}, the exchange deadline), so a "
            f"long exchange is ended by its own timeout, not taken for a stall"
        )


def budget_of(fleet: FleetConfig) -> tuple[str, float]:
    """("steps", H) or ("seconds", T) from `fleet.budget`."""
    kind, _, value = fleet.budget.partition(":")
    return kind, float(value)


def _check_budget(fleet: FleetConfig, errors: list[str]) -> None:
    kind, _, value = fleet.budget.partition(":")
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if (
        kind not in ("steps", "seconds")
        or amount <= 0
        or (kind == "steps" and amount != int(amount))
    ):
        errors.append(
            f"fleet.budget = {fleet.budget!r}: allowed forms: steps:H (H > 0) or seconds:T (T > 0)"
        )
    elif kind == "steps" and amount % fleet.fragments:
        errors.append(
            f"fleet.fragments = {fleet.fragments}: must divide H of fleet.budget = "
            f"{fleet.budget!r}, so a fragment's round comes every H / fragments inner steps"
        )
    elif fleet.warm_start_steps and kind != "steps":
        errors.append(
            f"fleet.warm_start_steps = {fleet.warm_start_steps}: counts inner steps, so it needs "
            f"fleet.budget = steps:H (got {fleet.budget!r})"
        )
    elif fleet.overlap and kind != "steps":
        errors.append(
            f"fleet.overlap = {fleet.overlap}: counts inner steps, so it needs "
            f"fleet.budget = steps:H (got {fleet.budget!r})"
        )
    elif fleet.overlap >= max(1, amount // fleet.fragments):
        errors.append(
            f"fleet.overlap = {fleet.overlap}: must be < H / fleet.fragments "
            f"({int(amount) // fleet.fragments}), so a round's exchange ends before the next begins"
        )


def from_dict(raw: dict[str, Any], errors: list[str] | None = None) -> Config:
    """Build a Config from nested dicts; problems are appended to `errors` (or raised)."""
    own_errors = [] if errors is None else errors
    sections = build_sections(raw, SECTIONS, own_errors)
    if errors is None and own_errors:
        raise ConfigError(_format_errors(None, own_errors))
    return Config(**sections)


def resolve_model(model: ModelConfig, errors: list[str]) -> None:
    """Fill dimensions left at 0 from the size preset and check that the shapes fit together."""
    preset = MODEL_SIZES.get(model.size)
    if preset is None:
        return  # already reported by the choices check
    for key, value in preset.items():
        if getattr(model, key) == 0:
            setattr(model, key, value)
    if model.dim % model.n_heads:
        errors.append(
            f"model.dim = {model.dim}: must be a multiple of model.n_heads ({model.n_heads})"
        )
    elif model.n_heads % model.n_kv_heads:
        errors.append(
            f"model.n_kv_heads = {model.n_kv_heads}: must divide model.n_heads ({model.n_heads})"
        )
    elif model.head_dim % 2:
        errors.append(f"model.dim / model.n_heads = {model.head_dim}: RoPE needs an even head size")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(to_toml(cfg.to_dict()))


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist. Pass --config with a TOML recipe, "
            f"for example configs/tiny.toml."
        )
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid TOML: {exc}. Fix the line named."
        ) from None


def _format_errors(path: str | Path | None, errors: list[str]) -> str:
    where = f" in {path}" if path else ""
    return f"invalid config{where}:\n  " + "\n  ".join(errors)
