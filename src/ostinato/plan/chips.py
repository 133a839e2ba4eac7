"""Hardware profiles: what one chip can do, with the source of every figure beside it.

Shipped profiles live in profiles/*.toml next to this module.
A profile is a TOML file. Each figure is either a bare number or an inline table
`{ value = ..., source = "..." }`; shipped profiles always give the source, and a figure recalled
rather than re-read at its source carries "[M]" (see shared/FACTS.md), while a figure we chose
carries "assumption". Users add profiles by passing a path instead of a name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

from ostinato.plan.errors import PlanError


@dataclass(frozen=True)
class Profile:
    """One chip (or one CPU host) as the planner sees it. Units are SI: FLOP/s, bytes, W, hours."""

    name: str
    description: str
    peak_flops: float  # dense bf16 FLOP/s of one chip (fp32 for the CPU host)
    mfu: float  # share of peak a well-tuned training step reaches (model FLOP utilisation)
    memory_bytes: float  # accelerator memory of one chip
    memory_bw_bytes_per_s: float  # accelerator memory bandwidth of one chip
    link_bytes_per_s: float  # scale-up link per chip inside an island (NVLink, HCCS, UB)
    chips_per_node: int  # chips behind one host: the unit a node failure takes down
    power_w: float  # power drawn per chip at full load, its share of the node included
    mtbf_chip_hours: float  # mean time between job-interrupting failures, per chip
    sources: dict[str, str]  # figure name -> where it comes from

    def source(self, figure: str) -> str:
        return self.sources.get(figure, "")


FIGURES = tuple(f.name for f in fields(Profile) if f.name not in ("name", "description", "sources"))


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with ostinato, sorted."""
    folder = resources.files("ostinato.plan") / "profiles"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str, field: str = "hardware.profile") -> Profile:
    """A shipped profile by name (`h100`) or a user profile by path (`my-chip.toml`); `field` is
    where the scenario named it, for the error."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise PlanError(f"{field} = {name_or_path!r}: no such file")
        return parse_profile(path.read_text(), origin=str(path))
    if name_or_path not in shipped_profiles():
        raise PlanError(
            f"{field} = {name_or_path!r}: unknown profile; allowed: "
            f"{', '.join(shipped_profiles())}, or the path of a TOML profile of your own"
        )
    text = (resources.files("ostinato.plan") / "profiles" / f"{name_or_path}.toml").read_text()
    return parse_profile(text, origin=name_or_path)


def parse_profile(text: str, origin: str) -> Profile:
    """Build a Profile from TOML text; a missing or non-positive figure is named in the error."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"profile {origin}: not valid TOML: {exc}") from None
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    for figure in FIGURES:
        entry = raw.get(figure)
        if isinstance(entry, dict):
            sources[figure] = str(entry.get("source", ""))
            entry = entry.get("value")
        if isinstance(entry, bool) or not isinstance(entry, (int, float)) or entry <= 0:
            problems.append(f"{figure} (got {entry!r})")
        else:
            values[figure] = entry
    if problems:
        raise PlanError(
            f"profile {origin}: missing or non-positive figures: {', '.join(problems)}. Every "
            f"profile needs all of {', '.join(FIGURES)}, each a positive number or "
            f'{{ value = ..., source = "..." }}'
        )
    if values["mfu"] > 1:
        raise PlanError(f"profile {origin}: mfu = {values['mfu']} must be a share, at most 1")
    return Profile(
        name=str(raw.get("name", origin)),
        description=str(raw.get("description", "")),
        chips_per_node=int(values.pop("chips_per_node")),
        sources=sources,
        **values,
    )
