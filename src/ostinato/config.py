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


class ConfigError(ValueError):
    """A user error in a config file or an override: the message names every bad field."""


def _opt(default: Any, help: str, **rules: Any) -> Any:
    return field(default=default, metadata={"help": help, **rules})


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
    size: str = _opt("tiny", "preset that fills every dimension not set here", choices=MODEL_SIZES)
    vocab_size: int = _opt(0, "tokens in the embedding table (0: from the size preset)", min=0)
    dim: int = _opt(0, "hidden size (0: from the size preset)", min=0)
    n_layers: int = _opt(0, "decoder layers (0: from the size preset)", min=0)
    n_heads: int = _opt(0, "query heads (0: from the size preset)", min=0)
    n_kv_heads: int = _opt(0, "key/value heads, grouped-query attention (0: preset)", min=0)
    ffn_dim: int = _opt(0, "SwiGLU intermediate size (0: from the size preset)", min=0)
    max_seq_len: int = _opt(256, "longest sequence the model is trained and served on", min=8)
    rope_theta: float = _opt(10000.0, "RoPE base frequency", min=1.0)
    norm_eps: float = _opt(1e-5, "RMSNorm epsilon", min=0.0)
    tie_embeddings: bool = _opt(False, "share the input embedding with the output head")
    init_std: float = _opt(0.02, "std of the normal initialisation", min=0.0)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class DataConfig:
    source: str = _opt(
        "reasoning",
        "reasoning: built-in worked problems; files: local text/JSONL/Parquet; stdlib: Python's own source",
        choices=("reasoning", "files", "stdlib"),
    )
    path: str = _opt("", "file or directory for source = files")
    text_field: str = _opt("text", "field that holds the text in JSONL and Parquet rows")
    tokenizer: str = _opt("", "tokenizer.json to use; empty: train a byte-level BPE on the corpus")
    seq_len: int = _opt(128, "tokens per training sequence", min=8)
    seed: int = _opt(1234, "seed of the corpus generator and the shuffling order")
    problems: int = _opt(20000, "training problems generated for source = reasoning", min=1)
    heldout: int = _opt(200, "held-out problems for the accuracy metric", min=0)
    max_bytes: int = _opt(20_000_000, "cap on the corpus text read from files or stdlib", min=1)


@dataclass
class TrainConfig:
    steps: int = _opt(100, "inner optimizer steps", min=1)
    batch_size: int = _opt(8, "sequences per rank per micro-batch", min=1)
    grad_accum: int = _opt(1, "micro-batches accumulated per step", min=1)
    lr: float = _opt(3e-3, "peak learning rate", min=0.0)
    min_lr_ratio: float = _opt(
        0.1, "final learning rate as a fraction of the peak", min=0.0, max=1.0
    )
    warmup_steps: int = _opt(10, "linear warm-up steps before the cosine decay", min=0)
    weight_decay: float = _opt(0.1, "AdamW weight decay", min=0.0)
    beta1: float = _opt(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = _opt(0.95, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)", min=0.0)
    seed: int = _opt(0, "seed of the model initialisation")
    dtype: str = _opt(
        "auto",
        "autocast dtype (auto: bf16 on accelerators, fp32 on CPU)",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = _opt(False, "wrap the model in torch.compile")
    threads: int = _opt(0, "CPU threads per rank (0: torch's default)", min=0)
    log_every: int = _opt(10, "steps between plain progress lines when not on a terminal", min=1)
    eval_problems: int = _opt(50, "held-out problems answered at the end for the accuracy", min=0)
    samples: int = _opt(3, "sample answers printed at the end", min=0)


@dataclass
class CheckpointConfig:
    every: int = _opt(50, "steps between checkpoints (0: only at the end)", min=0)
    keep: int = _opt(3, "checkpoints kept; older ones are deleted", min=1)
    async_save: bool = _opt(True, "write checkpoints in a background thread")


@dataclass
class HardwareConfig:
    device: str = _opt("auto", "where ranks run", choices=("auto", "cpu", "cuda", "npu", "mps"))
    backend: str = _opt("auto", "collective backend", choices=("auto", "gloo", "nccl", "hccl"))
    timeout_s: float = _opt(300.0, "timeout of one collective inside an island", min=1.0)


@dataclass
class FleetConfig:
    coordinator: str = _opt("", "HOST:PORT of the fleet coordinator; empty: train one island alone")
    island: str = _opt("a", "this island's name, unique in the fleet")
    token: str = _opt("", "the fleet's shared secret (or OSTINATO_FLEET_TOKEN)")
    budget: str = _opt("steps:20", "inner work per round: steps:H or seconds:T")
    rounds: int = _opt(0, "rounds in the run (0: train.steps / H)", min=0)
    compression: str = _opt(
        "int8", "pseudo-gradients on the wire", choices=("fp32", "bf16", "int8", "int4")
    )
    block: int = _opt(128, "values per quantization block (one fp32 scale each)", min=2)
    outer_lr: float = _opt(0.7, "outer Nesterov SGD learning rate (DiLoCo: 0.7)", min=0.0)
    outer_momentum: float = _opt(0.9, "outer Nesterov momentum (DiLoCo: 0.9)", min=0.0, max=1.0)
    expect: int = _opt(0, "islands to wait for before the first round (0: whoever is there)", min=0)
    min_islands: int = _opt(
        1, "fewest islands that may commit a round after the grace window", min=1
    )
    grace_s: float = _opt(
        5.0, "how long ready islands wait for the others before a partial round", min=0.0
    )
    timeout_s: float = _opt(20.0, "timeout of one cross-island collective", min=0.5)
    heartbeat_s: float = _opt(0.5, "seconds between heartbeats", min=0.05)
    heartbeat_timeout_s: float = _opt(5.0, "silence after which an island counts as gone", min=0.2)
    connect_timeout_s: float = _opt(60.0, "how long to wait for the coordinator", min=0.5)
    checkpoint_every: int = _opt(5, "rounds between durable fleet checkpoints (0: never)", min=0)
    checkpoint_dir: str = _opt("", "where fleet checkpoints go (default: next to the island's run)")
    link: str = _opt("", "emulated link of this island: latency=50ms,bandwidth=100mbit,loss=0")
    slowdown: float = _opt(
        1.0, "emulate an island this many times slower (tests, benchmarks)", min=1.0
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "hardware": HardwareConfig,
    "fleet": FleetConfig,
}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML recipe, apply `section.key=value` overrides, validate and resolve presets."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    errors: list[str] = []
    for item in overrides:
        _apply_override(raw, item, errors)
    cfg = from_dict(raw, errors)
    resolve_model(cfg.model, errors)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        errors.append(
            f"data.seq_len = {cfg.data.seq_len}: must be <= model.max_seq_len ({cfg.model.max_seq_len})"
        )
    _check_budget(cfg.fleet, errors)
    if cfg.fleet.block % 2:
        errors.append(
            f"fleet.block = {cfg.fleet.block}: must be even (4-bit values are packed in pairs)"
        )
    if errors:
        raise ConfigError(_format_errors(path, errors))
    return cfg


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


def from_dict(raw: dict[str, Any], errors: list[str] | None = None) -> Config:
    """Build a Config from nested dicts; problems are appended to `errors` (or raised)."""
    own_errors = [] if errors is None else errors
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            own_errors.append(f"[{name}]: unknown section; allowed: {', '.join(SECTIONS)}")
        elif not isinstance(value, dict):
            own_errors.append(f"[{name}]: must be a table of keys, got {value!r}")
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        sections[name] = _build_section(
            name, cls, table if isinstance(table, dict) else {}, own_errors
        )
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


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    return str(value)


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


def _apply_override(raw: dict[str, Any], item: str, errors: list[str]) -> None:
    key, sep, text = item.removeprefix("--").partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        errors.append(f"override {item!r}: expected --section.key=value")
        return
    raw.setdefault(section, {})
    if isinstance(raw[section], dict):
        raw[section][name] = _parse_value(text)


def _parse_value(text: str) -> Any:
    """Override values use TOML syntax (1, 0.5, true, "x"); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _build_section(name: str, cls: type, table: dict[str, Any], errors: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            errors.append(f"{name}.{key}: unknown key; allowed: {', '.join(fields)}")
            continue
        problem = _check_value(fields[key], value)
        if problem:
            errors.append(f"{name}.{key} = {value!r}: {problem}")
        else:
            values[key] = float(value) if _field_type(fields[key]) is float else value
    return cls(**values)


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]


def _check_value(f: dataclasses.Field, value: Any) -> str | None:
    kind = _field_type(f)
    rules = f.metadata
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        pass
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return f"must be {kind.__name__} ({rules['help']})"
    if "choices" in rules and value not in rules["choices"]:
        return f"allowed values: {', '.join(map(str, rules['choices']))}"
    if "min" in rules and value < rules["min"]:
        return f"must be >= {rules['min']} ({rules['help']})"
    if "max" in rules and value > rules["max"]:
        return f"must be <= {rules['max']} ({rules['help']})"
    return None


def _format_errors(path: str | Path | None, errors: list[str]) -> str:
    where = f" in {path}" if path else ""
    return f"invalid config{where}:\n  " + "\n  ".join(errors)
