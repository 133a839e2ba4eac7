"""Scenarios: what the user wants to train, on what, how reliably, and with which strategy.

A scenario is a TOML file with the sections below (every key optional), a preset shipped in
presets/*.toml, or both (the file's keys win over the preset's), followed by `section.key=value`
overrides. A preset may carry a [sweep] table of `"section.key" = [values]` that `plan` runs as a
table. All problems are collected and raised as one PlanError that names every bad field.
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

from ostinato.plan.errors import PlanError
from ostinato.schema import apply_override, build_sections, option, parse_value, toml_value

STRATEGIES = ("sync", "torchft", "fleet")
# Bits per pseudo-gradient element on the wire; int8 and 4bit carry per-block scales, which add
# under 1% at the block sizes ostinato uses, so they are left out.
COMPRESSION_BITS = {"fp32": 32, "bf16": 16, "int8": 8, "4bit": 4}


@dataclass
class ModelSpec:
    params: float = option(8e9, "total parameters, every expert of a mixture of experts", gt=0)
    active_params: float = option(0.0, "parameters used per token (MoE); 0: all of them", ge=0)
    n_layers: int = option(
        0, "decoder layers, for the attention FLOPs (0: leave attention out)", ge=0
    )
    dim: int = option(0, "hidden size, for the attention FLOPs", ge=0)
    seq_len: int = option(8192, "tokens per training sequence", gt=0)
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
    inner_steps: int = option(500, "inner steps per round, H (fleet)", gt=0)
    compression: str = option(
        "int8", "pseudo-gradient encoding (fleet)", choices=tuple(COMPRESSION_BITS)
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

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Scenario)}


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
        for section, table in _parse_toml(Path(path).read_text(), path).items():
            if isinstance(table, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **table}
            else:
                raw[section] = table
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings, values in TOML syntax (a bare word is taken as a string)."""
    out, errors = copy.deepcopy(raw), []
    for item in overrides:
        apply_override(out, item, errors)
    if errors:
        raise PlanError("; ".join(errors) + ", e.g. hardware.chips=4096")
    return out


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
    scenario = Scenario(**build_sections(raw, SECTIONS, errors))
    errors.extend(_cross_checks(scenario))
    if errors:
        raise PlanError("invalid scenario:\n  " + "\n  ".join(errors))
    return scenario


def _cross_checks(s: Scenario) -> list[str]:
    """Problems that involve more than one field; memory needs the profile and lives in costs."""
    hw, errors = s.hardware, []
    if hw.islands > hw.chips:
        errors.append(f"hardware.islands = {hw.islands}: more islands than chips ({hw.chips})")
    elif hw.chips % hw.islands:
        errors.append(f"hardware.chips = {hw.chips}: must split evenly into {hw.islands} islands")
    if s.model.active_params > s.model.params:
        errors.append(f"model.active_params = {s.model.active_params:g}: exceeds model.params")
    if s.strategy.kind != "sync" and hw.islands < 2:
        errors.append(
            f"strategy.kind = {s.strategy.kind}: needs hardware.islands >= 2, since a failed "
            "island recovers from a healthy one; with one island use kind = sync"
        )
    if s.model.batch_tokens > s.model.tokens:
        errors.append("model.batch_tokens: larger than model.tokens; the run is not one step")
    return errors


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{origin}: not valid TOML: {exc}") from None
