"""Fault schedules: `--faults` text parsed into validated faults, random storms expanded.

A schedule is `;`-separated entries. A fault is `KIND@key=value,...`, for example
`crash@island=b,step=40; hang@island=a,round=3; stall@island=b,step=60; nan@step=70;
slow@island=b,factor=3`; a storm is
`storm:mtbf=30s,seed=7[,kinds=crash+hang+bitflip+nan][,duration=600s]` and expands, always the
same way for a seed, into faults at wall-clock times. Every entry is checked here, before any
process starts, so a typo never costs a run.

Values are kept in SI units: bandwidth in bits per second, latency in seconds.

Storm quorum rule: only crash and hang take an island down, each for `restart_s`. Downing faults
arrive across the fleet at rate p/mtbf (p = share of the storm's kinds that are crash or hang), so
by Little's law p * restart_s / mtbf islands are down on average. A storm is refused when that
exceeds islands - min_islands, or when islands - min_islands < 1 and it holds crash or hang. The
expansion also never breaks the quorum: a downing fault that would leave fewer than min_islands
up is dropped, and faults only strike islands that are up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

KINDS = ("crash", "hang", "nan", "bitflip", "slow", "link", "spike", "stall")
STORM_KINDS = ("crash", "hang", "bitflip", "nan")
DEFAULT_STORM_KINDS = ("crash", "hang", "bitflip")
DOWNING = ("crash", "hang")  # kinds that take an island down until it restarts
STORM_KEYS = ("mtbf", "seed", "kinds", "duration")

_UNITS_BANDWIDTH = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_UNITS_DURATION = {"ms": 1e-3, "s": 1.0, "m": 60.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class _Rule:
    """What one fault kind accepts."""

    keys: tuple[str, ...]  # allowed keys besides island
    island_required: bool  # False: the first island when omitted
    moment_required: bool  # False: no step/round means from the start


_RULES = {
    "crash": _Rule(("step", "round"), True, True),
    "hang": _Rule(("step", "round"), True, True),
    "stall": _Rule(("step", "round"), True, True),
    "nan": _Rule(("step", "round"), False, True),
    "bitflip": _Rule(("step", "round"), False, True),
    "slow": _Rule(("step", "round", "factor"), True, False),
    "link": _Rule(("step", "round", "bandwidth", "latency", "loss"), True, False),
    # A spike poisons a data window, which is addressed by inner step only.
    "spike": _Rule(("step", "window"), False, True),
}


@dataclass(frozen=True)
class Fault:
    """One fault to inject. Exactly one of step, round, at_s sets its moment, or none: from the
    start (slow, link). params hold sorted (key, value) pairs so a fault stays hashable."""

    kind: str
    island: str
    step: int | None = None  # inner step of that island
    round: int | None = None  # fleet round
    at_s: float | None = None  # seconds since the run started (storms)
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.params, dict):  # a dict is handier to write; store it hashable
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))

    def param(self, key: str, default: float | None = None) -> float | None:
        return dict(self.params).get(key, default)


def parse_faults(
    spec: str,
    islands: list[str],
    *,
    steps: int | None = None,
    rounds: int | None = None,
    min_islands: int = 1,
    restart_s: float = 10.0,
    duration_s: float | None = None,
) -> list[Fault]:
    """Parse a fault schedule for a fleet of `islands`, sorted by moment: faults from the start,
    then by wall-clock time, then by round, then by inner step. Raises ValueError naming the
    problem and the allowed values. steps/rounds, when given, bound step=/round=; duration_s is
    how long a storm runs unless it says duration=."""
    if not islands or len(set(islands)) != len(islands):
        raise ValueError(f"islands must be distinct names, at least one; got {islands}")
    if not 1 <= min_islands <= len(islands):
        raise ValueError(f"min_islands must be between 1 and {len(islands)}; got {min_islands}")
    faults: list[Fault] = []
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        kind, pairs = _split_entry(entry)
        if kind == "storm":
            storm = _storm_settings(entry, pairs, islands, min_islands, restart_s, duration_s)
            faults += _expand_storm(islands, min_islands, restart_s, **storm)
        else:
            faults.append(_fault(entry, kind, pairs, islands, steps, rounds))
    return sorted(faults, key=_order)


def parse_bandwidth(text: str) -> float:
    """'10mbit' -> 1e7 bits per second; units kbit, mbit, gbit."""
    match = re.fullmatch(_NUMBER + r"\s*(kbit|mbit|gbit)", text.strip().lower())
    if match is None or float(match[1]) <= 0:
        raise ValueError(
            f"bandwidth {text!r} needs a positive number and a unit: kbit, mbit or gbit "
            "(for example 10mbit, 1gbit)"
        )
    return float(match[1]) * _UNITS_BANDWIDTH[match[2]]


def parse_duration(text: str) -> float:
    """'50ms' -> 0.05 seconds; units ms, s, m (minutes)."""
    match = re.fullmatch(_NUMBER + r"\s*(ms|s|m)", text.strip().lower())
    if match is None:
        raise ValueError(
            f"duration {text!r} needs a non-negative number and a unit: ms, s or m "
            "(for example 50ms, 30s, 10m)"
        )
    return float(match[1]) * _UNITS_DURATION[match[2]]


def to_json(fault: Fault) -> dict:
    """A plain dict, as written to chaos.json and handed to island processes."""
    return {
        "kind": fault.kind,
        "island": fault.island,
        "step": fault.step,
        "round": fault.round,
        "at_s": fault.at_s,
        "params": dict(fault.params),
    }


def from_json(data: dict) -> Fault:
    if data.get("kind") not in KINDS:
        raise ValueError(f"unknown fault kind {data.get('kind')!r}; allowed: {', '.join(KINDS)}")
    return Fault(
        kind=data["kind"],
        island=data["island"],
        step=data.get("step"),
        round=data.get("round"),
        at_s=data.get("at_s"),
        params=dict(data.get("params") or {}),
    )


def _error(entry: str, problem: str) -> ValueError:
    return ValueError(f"fault {entry!r}: {problem}")


def _split_entry(entry: str) -> tuple[str, dict[str, str]]:
    """'crash@island=b,step=40' -> ('crash', {'island': 'b', 'step': '40'}). Storms are written
    with ':' and faults with '@'; either is read, a mix-up is not worth refusing."""
    head, _, rest = entry.partition("@") if "@" in entry else entry.partition(":")
    pairs: dict[str, str] = {}
    for item in (i.strip() for i in rest.split(",")):
        if not item:
            continue
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise _error(entry, f"{item!r} is not key=value")
        if key in pairs:
            raise _error(entry, f"{key}= is given twice")
        pairs[key] = value
    return head.strip().lower(), pairs


def _fault(entry, kind, pairs, islands, steps, rounds) -> Fault:
    if kind not in _RULES:
        raise _error(entry, f"unknown fault kind {kind!r}; allowed: {', '.join(KINDS)}, storm")
    rule = _RULES[kind]
    allowed = ("island", *rule.keys)
    for key in pairs:
        if key not in allowed:
            raise _error(entry, f"unknown key {key!r} for {kind}; allowed: {', '.join(allowed)}")
    island = _island(entry, kind, pairs.get("island"), islands, rule.island_required)
    step = _bounded(entry, "step", pairs.get("step"), steps)
    round_ = _bounded(entry, "round", pairs.get("round"), rounds)
    if step is not None and round_ is not None:
        raise _error(entry, "give either step= or round=, not both")
    if rule.moment_required and step is None and round_ is None:
        moments = " or ".join(f"{k}=" for k in rule.keys if k in ("step", "round"))
        raise _error(entry, f"{kind} needs {moments} to say when it strikes")
    params = _params(entry, kind, pairs)
    return Fault(kind, island, step, round_, None, params)


def _island(entry, kind, name, islands, required) -> str:
    if name is None:
        if required:
            raise _error(entry, f"{kind} needs island=; islands: {', '.join(islands)}")
        return islands[0]
    if name not in islands:
        raise _error(entry, f"island {name!r} does not exist; islands: {', '.join(islands)}")
    return name


def _bounded(entry, key, text, limit) -> int | None:
    if text is None:
        return None
    value = int(_number(entry, key, text, whole=True))
    if limit is not None and value > limit:
        raise _error(
            entry, f"{key} {value} is beyond the run's {limit} {key}s (allowed 0..{limit})"
        )
    return value


def _number(entry, key, text, *, whole=False) -> float:
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise _error(entry, f"{key}={text!r} is not {kind}") from None
    if not math.isfinite(value) or value < 0:
        raise _error(entry, f"{key}={text!r} must be a finite number >= 0")
    return value


def _params(entry, kind, pairs) -> dict[str, float]:
    """The kind's own keys, parsed to SI units and range-checked."""
    params: dict[str, float] = {}
    try:
        if "bandwidth" in pairs:
            params["bandwidth"] = parse_bandwidth(pairs["bandwidth"])
        if "latency" in pairs:
            params["latency"] = parse_duration(pairs["latency"])
    except ValueError as e:
        raise _error(entry, str(e)) from None
    if "loss" in pairs:
        params["loss"] = _number(entry, "loss", pairs["loss"])
        if params["loss"] >= 1:
            raise _error(entry, "loss is a packet-loss probability, allowed 0 <= loss < 1")
    if kind == "link" and not params:
        raise _error(entry, "link needs at least one of bandwidth=, latency=, loss=")
    if kind == "slow":
        if "factor" not in pairs:
            raise _error(entry, "slow needs factor= (how many times slower, >= 1)")
        params["factor"] = _number(entry, "factor", pairs["factor"])
        if params["factor"] < 1:
            raise _error(entry, "factor is how many times slower the island runs, allowed >= 1")
    if kind == "spike":
        params["window"] = int(_number(entry, "window", pairs.get("window", "1"), whole=True))
        if params["window"] < 1:
            raise _error(entry, "window is the number of poisoned steps, allowed >= 1")
    return params


def _storm_settings(entry, pairs, islands, min_islands, restart_s, duration_s) -> dict:
    """Checked storm keys, refused when the storm could never leave a quorum."""
    for key in pairs:
        if key not in STORM_KEYS:
            raise _error(entry, f"unknown key {key!r} for storm; allowed: {', '.join(STORM_KEYS)}")
    if "mtbf" not in pairs:
        raise _error(entry, "storm needs mtbf= (mean time between faults across the fleet)")
    try:
        mtbf = parse_duration(pairs["mtbf"])
        duration = parse_duration(pairs["duration"]) if "duration" in pairs else duration_s
    except ValueError as e:
        raise _error(entry, str(e)) from None
    if mtbf <= 0:
        raise _error(entry, "mtbf must be > 0")
    if duration is None or duration <= 0:
        raise _error(entry, "storm needs a positive duration= (for example duration=600s)")
    kinds = _storm_kinds(entry, pairs.get("kinds"))
    _check_quorum(entry, kinds, mtbf, len(islands), min_islands, restart_s)
    seed = int(_number(entry, "seed", pairs.get("seed", "0"), whole=True))
    return {"kinds": kinds, "mtbf": mtbf, "seed": seed, "duration": duration}


def _storm_kinds(entry, text) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_STORM_KINDS
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split("+")))
    for kind in kinds:
        if kind not in STORM_KINDS:
            raise _error(
                entry,
                f"storm kinds {kind!r} unknown; allowed: {', '.join(STORM_KINDS)}, joined by +",
            )
    return kinds


def _check_quorum(entry, kinds, mtbf, islands, min_islands, restart_s) -> None:
    share_down = sum(k in DOWNING for k in kinds) / len(kinds)
    if share_down == 0:
        return
    spare = islands - min_islands
    if spare < 1:
        raise _error(
            entry,
            f"a storm with crash or hang needs more islands than min_islands ({min_islands}) "
            f"to keep a quorum; there are {islands}",
        )
    expected_down = share_down * restart_s / mtbf
    if expected_down > spare:
        raise _error(
            entry,
            f"storm could never leave a quorum: with mtbf {mtbf:g} s and {restart_s:g} s per "
            f"restart, {expected_down:.2f} islands would be down on average, more than the "
            f"{spare} that may be (islands {islands} - min_islands {min_islands}); "
            f"allowed mtbf >= {share_down * restart_s / spare:g} s",
        )


def _expand_storm(islands, min_islands, restart_s, *, kinds, mtbf, seed, duration) -> list[Fault]:
    """Exponential inter-arrivals of mean mtbf; kind and island drawn uniformly, the island among
    those up. Every arrival draws the same numbers, so dropping one does not shift the rest."""
    rng = np.random.default_rng(seed)
    back_at = dict.fromkeys(islands, 0.0)  # island -> when it is up again
    faults = []
    t = rng.exponential(mtbf)
    while t < duration:
        kind = kinds[rng.integers(len(kinds))]
        pick = rng.random()
        up = [name for name in islands if back_at[name] <= t]
        if kind not in DOWNING or len(up) > min_islands:
            island = up[int(pick * len(up))]
            faults.append(Fault(kind, island, at_s=round(float(t), 3)))
            if kind in DOWNING:
                back_at[island] = t + restart_s
        t += rng.exponential(mtbf)
    return faults


def _order(fault: Fault) -> tuple:
    if fault.at_s is not None:
        moment = (1, fault.at_s)
    elif fault.round is not None:
        moment = (2, fault.round)
    elif fault.step is not None:
        moment = (3, fault.step)
    else:
        moment = (0, 0)
    return (*moment, fault.island, fault.kind)
