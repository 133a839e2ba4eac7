"""Scenarios: what the user wants to train, on what, how reliably, and with which strategy.

A scenario is a TOML file with the sections below (every key optional), a preset shipped in
presets/*.toml, or both (the file's keys win over the preset's), followed by `section.key=value`
overrides. A preset may carry a [sweep] table of `"section.key" = [values]` that `plan` runs as a
table. All problems are collected and raised as one PlanError that names every bad field.

The hardware is either identical islands (hardware.profile, chips, islands) or a list of island
kinds, `[[islands]]` tables of profile, chips (per island) and count, overridden as
`islands.N.key=value`. Either way the built Scenario holds the list, with every figure that an
island kind leaves at 0 taken from [hardware], [reliability] or [run].
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ostinato.config import FleetConfig
from ostinato.fleet.compress import KINDS
from ostinato.plan.chips import load_profile
from ostinato.plan.errors import PlanError
from ostinato.schema import apply_override, build_sections, option, parse_value, toml_value

STRATEGIES = ("sync", "torchft", "fleet")
BUDGETS = ("steps", "time")
# The [hardware] keys that [[islands]] replaces; giving both is refused.
UNIFORM_KEYS = ("profile", "chips", "islands")


@dataclass
class ModelSpec:
    params: float = option(8e9, "total parameters, every expert of a mixture of experts", gt=0)
    active_params: float = option(0.0, "parameters used per token (MoE); 0: all of them", ge=0)
    n_layers: int = option(
        0, "decoder layers, for the attention FLOPs (0: leave attention out)", ge=0
    )
    dim: int = option(0, "hidden size, for the attention FLOPs", ge=0)
    seq_len: int = option(8192, "tokens per training sequence", gt=0)
    vocab_size: int = option(
        0, "vocabulary, for the output layer's activations (0: leave them out)", ge=0
    )
    micro_batch: int = option(
        1, "sequences each chip runs forward and backward at once (train.batch_size)", gt=0
    )
    tokens: float = option(1e12, "tokens to train on", gt=0)
    batch_tokens: float = option(4e6, "tokens per optimizer step, all islands together", gt=0)

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per active parameter (forward 2, backward 4) plus causal
        attention, whose score and value matmuls cost 6 * layers * seq_len * dim per token."""
        active = self.active_params or self.params
        return 6 * active + 6 * self.n_layers * self.seq_len * self.dim


@dataclass
class HardwareSpec:
    profile: str = option("h100", "shipped profile name or path of a TOML profile")
    chips: int = option(1024, "chips in the whole run", gt=0)
    islands: int = option(1, "islands: groups of chips with a fast local link", gt=0)
    mfu: float = option(
        0.0, "model FLOP utilisation inside an island (0: the profile's)", ge=0, le=1
    )
    inter_island_gbit_s: float = option(100.0, "link between islands, Gbit/s per island", gt=0)


@dataclass
class IslandSpec:
    profile: str = option("h100", "shipped profile name or path of a TOML profile")
    chips: int = option(1024, "chips in each island of this kind", gt=0)
    count: int = option(1, "islands of this kind", gt=0)
    mfu: float = option(0.0, "model FLOP utilisation (0: hardware.mfu)", ge=0, le=1)
    inter_island_gbit_s: float = option(
        0.0, "link of each island to the others, Gbit/s (0: hardware.inter_island_gbit_s)", ge=0
    )
    chip_mtbf_hours: float = option(
        0.0, "hours between crashes per chip (0: reliability.chip_mtbf_hours)", ge=0
    )
    price_per_chip_hour: float = option(
        0.0, "price of one chip-hour (0: run.price_per_chip_hour)", ge=0
    )


ISLAND_KEYS = tuple(f.name for f in dataclasses.fields(IslandSpec))
ISLAND_REQUIRED = ("profile", "chips")


@dataclass
class ReliabilitySpec:
    chip_mtbf_hours: float = option(0.0, "hours between crashes per chip (0: the profile's)", ge=0)
    node_mtbf_hours: float = option(0.0, "hours between host failures per node (0: none)", ge=0)
    hang_mtbf_chip_hours: float = option(0.0, "hours between hangs per chip (0: none)", ge=0)
    sdc_mtbf_chip_hours: float = option(
        0.0, "hours between silent corruptions per chip (0: none)", ge=0
    )
    hang_detect_s: float = option(300.0, "seconds until a hang is declared a failure", ge=0)
    sdc_detect_s: float = option(
        3600.0, "seconds of work a corruption spoils before a guard sees it", ge=0
    )
    job_restart_s: float = option(600.0, "seconds to restart the whole job (sync)", ge=0)
    island_restart_s: float = option(120.0, "seconds to restart one island (torchft, fleet)", ge=0)


@dataclass
class StrategySpec:
    kind: str = option("sync", "how faults are survived", choices=STRATEGIES)
    checkpoint_interval_s: float = option(
        0.0, 'seconds of work between checkpoints (sync), or "optimal" (Young/Daly)', ge=0
    )
    checkpoint_s: float = option(30.0, "seconds a checkpoint blocks training (sync)", ge=0)
    parallel: str = option(
        "fsdp",
        "how an island's chips hold the training state, as the trainer's parallel.strategy: "
        "fsdp shards it over the island, ddp keeps a full copy on every chip",
        choices=("fsdp", "ddp"),
    )
    activation_checkpointing: str = option(
        "none",
        "as the trainer's parallel.activation_checkpointing: recompute every layer's "
        "activations (full), every other layer's (selective), or none",
        choices=("none", "full", "selective"),
    )
    inner_steps: int = option(500, "inner steps per round, H (fleet)", gt=0)
    budget: str = option(
        "steps",
        "round budget of a fleet: steps (H inner steps each, fast islands wait for the slowest) "
        "or time (the slowest island's H steps; faster islands fit in as many as they can)",
        choices=BUDGETS,
    )
    compression: str = option(
        "int8", "pseudo-gradient encoding (fleet), as fleet.compression", choices=KINDS
    )
    block: int = option(
        FleetConfig.block, "values per quantization block (fleet), as fleet.block", ge=2
    )


@dataclass
class RunSpec:
    trials: int = option(400, "Monte Carlo trials", gt=0)
    seed: int = option(0, "seed of the Monte Carlo draws", ge=0)
    deadline_hours: float = option(0.0, "deadline for p_finish_by_deadline (0: none)", ge=0)
    price_per_chip_hour: float = option(0.0, "price of one chip-hour (0: cost unknown)", ge=0)


@dataclass
class Scenario:
    model: ModelSpec = field(default_factory=ModelSpec)
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    reliability: ReliabilitySpec = field(default_factory=ReliabilitySpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    run: RunSpec = field(default_factory=RunSpec)
    # Island kinds with every inherited figure filled in; build() always sets it.
    islands: list[IslandSpec] = field(default_factory=list)
    from_list: bool = False  # the user gave [[islands]] rather than the uniform [hardware] keys

    @property
    def chips(self) -> int:
        return sum(i.chips * i.count for i in self.islands)

    @property
    def island_count(self) -> int:
        return sum(i.count for i in self.islands)

    def field_name(self, index: int, key: str) -> str:
        """How the user wrote island kind `index`'s `key`, for error messages."""
        if self.from_list:
            return f"islands[{index}].{key}"
        return {"chips": "hardware.chips / hardware.islands"}.get(key, f"hardware.{key}")

    def to_raw(self) -> dict[str, Any]:
        """Tables that build() turns back into this scenario, the islands as a list."""
        raw: dict[str, Any] = dataclasses.asdict(self)
        del raw["from_list"]
        for key in UNIFORM_KEYS:
            del raw["hardware"][key]
        return raw


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "hardware": HardwareSpec,
    "reliability": ReliabilitySpec,
    "strategy": StrategySpec,
    "run": RunSpec,
}


def shipped_presets() -> list[str]:
    folder = resources.files("ostinato.plan") / "presets"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_raw(path: str | None, preset: str | None) -> dict[str, Any]:
    """The preset's tables, then the file's on top: plain nested dicts, not yet checked."""
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in shipped_presets():
            raise PlanError(
                f"--preset {preset!r}: unknown preset; allowed: {', '.join(shipped_presets())}"
            )
        text = (resources.files("ostinato.plan") / "presets" / f"{preset}.toml").read_text()
        raw = _parse_toml(text, f"preset {preset}")
    if path is not None:
        if not Path(path).is_file():
            raise PlanError(f"scenario file {path} does not exist")
        tables = _parse_toml(Path(path).read_text(), path)
        _replace_preset_hardware(raw, tables)
        if isinstance(raw.get("fitted"), dict):  # the file's own figures are not the preset's fit
            set_again = _fields_set(tables)
            raw["fitted"] = {k: v for k, v in raw["fitted"].items() if k not in set_again}
        for section, table in tables.items():
            if isinstance(table, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **table}
            else:
                raw[section] = table
    return raw


def _fields_set(tables: dict[str, Any]) -> list[str]:
    """The "section.key" fields a scenario file sets (its islands as islands.N.key)."""
    keys = []
    for section, table in tables.items():
        if isinstance(table, dict):
            keys += [f"{section}.{key}" for key in table]
        elif section == "islands" and isinstance(table, list):
            for n, island in enumerate(t for t in table if isinstance(t, dict)):
                keys += [f"islands.{n}.{key}" for key in island]
    return keys


def _replace_preset_hardware(preset: dict[str, Any], file: dict[str, Any]) -> None:
    """The file's hardware replaces the preset's when it comes in the other form: [[islands]]
    for identical islands, or identical islands for [[islands]]."""
    hardware = preset.get("hardware")
    if "islands" in file and isinstance(hardware, dict):
        preset["hardware"] = {k: v for k, v in hardware.items() if k not in UNIFORM_KEYS}
    file_hardware = file.get("hardware")
    if isinstance(file_hardware, dict) and any(k in file_hardware for k in UNIFORM_KEYS):
        preset.pop("islands", None)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings, values in TOML syntax (a bare word is taken as a string)."""
    out, errors = copy.deepcopy(raw), []
    for item in overrides:
        if item.removeprefix("--").startswith("islands."):
            _override_island(out, item.removeprefix("--"), errors)
        else:
            apply_override(out, item, errors)
    if errors:
        raise PlanError("; ".join(errors) + ", e.g. hardware.chips=4096")
    return out


def _override_island(raw: dict[str, Any], item: str, errors: list[str]) -> None:
    """`islands.N.key=value`: set one key of the N-th (from 0) [[islands]] table."""
    key, sep, text = item.partition("=")
    parts = key.split(".")
    islands = raw.get("islands")
    count = len(islands) if isinstance(islands, list) else 0
    if not count:
        errors.append(
            f"override {item!r}: the scenario has no [[islands]] tables; its identical islands "
            "are changed with hardware.profile, hardware.chips and hardware.islands"
        )
        return
    if not sep or len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= count:
        errors.append(
            f"override {item!r}: expected islands.N.key=value with N from 0 to {count - 1} "
            f"(the scenario has {count} [[islands]] tables) and key one of {', '.join(ISLAND_KEYS)}"
        )
        return
    table = islands[int(parts[1])]
    if isinstance(table, dict):
        table[parts[2]] = parse_value(text)


def sweep_points(sweeps: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of the swept values, each as a list of overrides."""
    keys = list(sweeps)
    combos = itertools.product(*(sweeps[k] for k in keys))
    return [[f"{k}={toml_value(v)}" for k, v in zip(keys, combo, strict=True)] for combo in combos]


def parse_sweep(arg: str) -> tuple[str, list[Any]]:
    """`section.key=v1,v2,...` from the command line."""
    key, sep, text = arg.partition("=")
    if not sep or "." not in key or not text:
        raise PlanError(
            f"--sweep {arg!r}: expected section.key=v1,v2,..., e.g. hardware.chips=1024,4096"
        )
    return key, [parse_value(v) for v in text.split(",")]


def build(raw: dict[str, Any]) -> Scenario:
    """Check every field of the raw tables and build the Scenario; one error lists all problems."""
    errors: list[str] = []
    strategy = raw.get("strategy")
    if isinstance(strategy, dict) and strategy.get("checkpoint_interval_s") == "optimal":
        raw = {**raw, "strategy": {**strategy, "checkpoint_interval_s": 0.0}}  # 0: Young/Daly
    # [fitted] labels fields (plan/fitted.py checks it); it changes nothing in the scenario
    tables = {k: v for k, v in raw.items() if k not in ("islands", "fitted")}
    scenario = Scenario(**build_sections(tables, SECTIONS, errors))
    if "islands" in raw:
        scenario.islands = _island_list(raw, errors)
        scenario.from_list = True
    else:
        scenario.islands = _uniform_islands(scenario.hardware, errors)
    scenario.islands = [_inherit(scenario, i) for i in scenario.islands]
    errors.extend(_cross_checks(scenario))
    if errors:
        raise PlanError("invalid scenario:\n  " + "\n  ".join(errors))
    return scenario


def _uniform_islands(hw: HardwareSpec, errors: list[str]) -> list[IslandSpec]:
    if hw.islands > hw.chips:
        errors.append(f"hardware.islands = {hw.islands}: more islands than chips ({hw.chips})")
    elif hw.chips % hw.islands:
        errors.append(f"hardware.chips = {hw.chips}: must split evenly into {hw.islands} islands")
    chips = max(1, hw.chips // hw.islands)
    return [IslandSpec(profile=hw.profile, chips=chips, count=hw.islands)]


def _island_list(raw: dict[str, Any], errors: list[str]) -> list[IslandSpec]:
    """The [[islands]] tables, each checked like a section; refused beside the uniform keys."""
    hardware = raw.get("hardware") if isinstance(raw.get("hardware"), dict) else {}
    clash = [f"hardware.{k}" for k in UNIFORM_KEYS if k in hardware]
    if clash:
        errors.append(
            f"{', '.join(clash)}: not allowed beside [[islands]]; give the hardware either as "
            "hardware.profile, chips and islands (identical islands) or as [[islands]] tables "
            "of profile, chips and count, not both"
        )
    tables = raw["islands"]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        errors.append(
            f"islands = {tables!r}: must be one or more [[islands]] tables, each with "
            f"{' and '.join(ISLAND_REQUIRED)} (count defaults to 1)"
        )
        return []
    out = []
    for n, table in enumerate(tables):
        name = f"islands[{n}]"
        missing = [k for k in ISLAND_REQUIRED if k not in table]
        if missing:
            errors.append(f"{name}: missing {', '.join(missing)}; keys: {', '.join(ISLAND_KEYS)}")
        out.append(build_sections({name: table}, {name: IslandSpec}, errors)[name])
    return out


def _inherit(s: Scenario, island: IslandSpec) -> IslandSpec:
    """The island kind with its zero figures taken from the scenario-wide ones."""
    return dataclasses.replace(
        island,
        mfu=island.mfu or s.hardware.mfu,
        inter_island_gbit_s=island.inter_island_gbit_s or s.hardware.inter_island_gbit_s,
        chip_mtbf_hours=island.chip_mtbf_hours or s.reliability.chip_mtbf_hours,
        price_per_chip_hour=island.price_per_chip_hour or s.run.price_per_chip_hour,
    )


def _cross_checks(s: Scenario) -> list[str]:
    """Problems that involve more than one field; memory needs the profile and lives in costs."""
    errors = _profile_errors(s)
    if s.model.active_params > s.model.params:
        errors.append(f"model.active_params = {s.model.active_params:g}: exceeds model.params")
    if s.strategy.kind != "sync" and s.island_count < 2:
        where = "the sum of islands[N].count" if s.from_list else "hardware.islands"
        errors.append(
            f"strategy.kind = {s.strategy.kind}: needs {where} >= 2, since a failed island "
            "recovers from a healthy one; with one island use kind = sync"
        )
    if s.strategy.compression == "int4" and s.strategy.block % 2:
        errors.append(
            f"strategy.block = {s.strategy.block}: must be even with int4 (4-bit values are "
            "packed in pairs, as fleet.block)"
        )
    if s.model.batch_tokens > s.model.tokens:
        errors.append("model.batch_tokens: larger than model.tokens; the run is not one step")
    return errors


def _profile_errors(s: Scenario) -> list[str]:
    errors = []
    for n, island in enumerate(s.islands):
        try:
            load_profile(island.profile, s.field_name(n, "profile"))
        except PlanError as exc:
            errors.append(str(exc))
    return errors


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{origin}: not valid TOML: {exc}") from None
