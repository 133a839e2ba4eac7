"""Calibration: fit the machine a recorded ostinato run ran on, then predict that run back.

Two layouts are read. An island run directory holds metrics.jsonl (one object per inner step:
step, step_s, compute_s, checkpoint_stall_s, recovery_s, tokens, ...) and config.toml. A fleet
directory holds one such run directory per island plus rounds.jsonl (one object per committed
round: round, attempt, members, bytes_sent (each member's, or one number), exchange_s, tokens,
digest) and, optionally,
goodput.json (`goodput` and island-seconds per category), which then is the measured goodput.
The fitted machine treats each island as one "chip" whose peak is the measured FLOP/s.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ostinato.config import FleetConfig, budget_of
from ostinato.goodput import account, read_events, restarts
from ostinato.jsonl import read_jsonl
from ostinato.plan.closed_form import expected
from ostinato.plan.costs import Costs, FaultKind, IslandCosts
from ostinato.plan.errors import PlanError

log = logging.getLogger("ostinato")
METRIC_KEYS = ("step", "step_s", "compute_s", "checkpoint_stall_s", "recovery_s", "tokens")
# Stands in for "no failure seen": a rate so low that the closed form predicts no failures.
NO_FAILURE_RATE = 1e-12


@dataclass
class IslandFit:
    """What one island's metrics say about its machine."""

    rows: int  # inner steps run, repeats after a rollback included
    kept: int  # distinct steps: the work that survived
    compute_s: float  # mean compute seconds of a step
    overhead_s: float  # mean seconds of a plain step that are neither compute nor a stall
    tokens: float  # mean tokens of a step
    wall_s: float  # sum of step_s
    kept_work_s: float  # step time of the steps that survived, less stalls and recoveries
    recoveries: list[float]  # recovery_s of each restart
    stalls: list[float]  # checkpoint_stall_s of each checkpoint


def calibrate_run(run_dir: str) -> dict[str, Any]:
    root = Path(run_dir)
    if (root / "metrics.jsonl").is_file():
        return _calibrate_island(root)
    islands = (
        sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file())
        if root.is_dir()
        else []
    )
    if not islands or not (root / "rounds.jsonl").is_file():
        raise PlanError(
            f"--calibrate {run_dir}: not an ostinato run. Expected RUN_DIR/metrics.jsonl (an island "
            "run) or RUN_DIR/<island>/metrics.jsonl with RUN_DIR/rounds.jsonl (a fleet run)"
        )
    return _calibrate_fleet(root, islands)


def model_size(config_path: Path) -> tuple[float, float]:
    """(parameters, training FLOPs per token) of the Llama model in an ostinato config.toml."""
    from ostinato.config import MODEL_SIZES

    raw = _read_toml(config_path)
    model = raw.get("model", {})
    dims = {
        **MODEL_SIZES.get(model.get("size", "tiny"), {}),
        **{k: v for k, v in model.items() if v},
    }
    try:
        d, layers, heads, kv, ffn, vocab = (
            int(dims[k])
            for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
        )
    except KeyError as exc:
        raise PlanError(
            f"{config_path}: [model] lacks {exc.args[0]}, needed to count parameters"
        ) from None
    head = d // heads
    per_layer = 2 * d * d + 2 * d * kv * head + 3 * d * ffn + 2 * d
    params = vocab * d * (1 if model.get("tie_embeddings") else 2) + layers * per_layer + d
    seq = int(raw.get("data", {}).get("seq_len", model.get("max_seq_len", 0)))
    return float(params), 6.0 * params + 6.0 * layers * seq * d


def fit_island(metrics_path: Path) -> IslandFit:
    rows = _read_jsonl(metrics_path, METRIC_KEYS)
    last_seen = {r["step"]: i for i, r in enumerate(rows)}  # a rerun step replaces its first try
    plain = [r for r in rows if not r["recovery_s"] and not r["checkpoint_stall_s"]] or rows
    overhead = max(0.0, statistics.fmean(r["step_s"] - r["compute_s"] for r in plain))
    return IslandFit(
        rows=len(rows),
        kept=len(last_seen),
        compute_s=statistics.fmean(r["compute_s"] for r in rows),
        overhead_s=overhead,
        tokens=statistics.fmean(r["tokens"] for r in rows),
        wall_s=sum(r["step_s"] for r in rows),
        kept_work_s=sum(_work_s(rows[i]) for i in last_seen.values()),
        recoveries=[r["recovery_s"] for r in rows if r["recovery_s"] > 0],
        # What a checkpoint adds to its step: the stall, and the step's time the stall leaves out.
        stalls=[
            max(r["checkpoint_stall_s"], r["step_s"] - r["compute_s"] - overhead - r["recovery_s"])
            for r in rows
            if r["checkpoint_stall_s"] > 0
        ],
    )


def _calibrate_island(root: Path) -> dict[str, Any]:
    """One island as a sync job. When the run wrote goodput.json, that is the measurement, and
    the time it saw outside any step (logging, evaluation) becomes idle time per step."""
    params, fpt = model_size(root / "config.toml")
    fit = fit_island(root / "metrics.jsonl")
    recorded = _read_goodput(root)
    idle_s = max(0.0, recorded["island_s"] - fit.wall_s) / fit.rows if recorded else 0.0
    progress = fit.kept * (fit.compute_s + fit.overhead_s + idle_s)
    rate = len(fit.recoveries) / fit.wall_s or NO_FAILURE_RATE
    restart = statistics.fmean(fit.recoveries) if fit.recoveries else 0.0
    # A hair over progress / checkpoints, so that rounding cannot add one more checkpoint.
    interval = progress / len(fit.stalls) * (1 + 1e-9) if fit.stalls else progress
    costs = Costs(
        strategy="sync",
        groups=(_fitted_island(1, rate, restart, fit.compute_s + fit.overhead_s, 1, fit.tokens),),
        exchange_s=0.0,
        tokens=fit.kept * fit.tokens,
        job_restart_s=restart,
        checkpoint_interval_s=interval,
        checkpoint_s=statistics.fmean(fit.stalls) if fit.stalls else 0.0,
        bytes_per_unit=0.0,
        idle_s=idle_s,
    )
    measured = {
        "wall_s": recorded["island_s"] if recorded else fit.wall_s,
        "goodput": recorded["goodput"] if recorded else fit.kept_work_s / fit.wall_s,
        "interruptions": len(fit.recoveries),
    }
    out = _result("island", 1, params, fpt, fit.tokens * fpt / fit.compute_s, costs, measured)
    out["fitted"]["idle_s"] = idle_s
    return out


def _read_goodput(root: Path) -> dict[str, float] | None:
    """goodput, island-seconds and wall seconds from the run's goodput.json, if it wrote one."""
    path = root / "goodput.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        recorded = {k: float(data[k]) for k in ("goodput", "island_s", "wall_s")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{path}: needs numbers goodput, island_s and wall_s ({exc})") from None
    if recorded["island_s"] <= 0 or recorded["wall_s"] <= 0:
        log.warning("%s records no time (its run logged no events): measuring from metrics", path)
        return None
    return recorded


def _calibrate_fleet(root: Path, dirs: list[Path]) -> dict[str, Any]:
    """Each island as its own kind with its measured step and its steps per round, so that on a
    step budget the others wait for a slow one as they did, and on a time budget they do not.
    A round lasts the busiest island's steps plus what the run spent around them (exchange,
    waiting for the round, checkpoints, gaps): the median time between commits when
    rounds.jsonl records it, else the exchange alone."""
    params, fpt = model_size(dirs[0] / "config.toml")
    fits = [fit_island(d / "metrics.jsonl") for d in dirs]
    rounds = _read_jsonl(root / "rounds.jsonl", ("round", "members", "bytes_sent", "exchange_s"))
    island_rounds = sum(len(r["members"]) for r in rounds)
    # Rows, not distinct steps: an island healed from a donor may number its steps afresh.
    inner = max(1, round(sum(f.rows for f in fits) / island_rounds))
    exchange_s = statistics.fmean(r["exchange_s"] for r in rounds)
    sent = statistics.fmean(_bytes_per_island(r) for r in rounds)
    recoveries, lived_s = _fleet_restarts(dirs)
    if not lived_s:  # no events: what the metrics say
        recoveries, lived_s = [s for f in fits for s in f.recoveries], sum(f.wall_s for f in fits)
    rate = len(recoveries) / lived_s or NO_FAILURE_RATE
    restart = statistics.fmean(recoveries) if recoveries else 0.0
    steps = [f.compute_s + f.overhead_s for f in fits]
    per_round = _steps_per_round(dirs, steps, inner)
    period = _round_period(rounds)
    busiest = max(n * step for n, step in zip(per_round, steps, strict=True))
    around = max(0.0, period - busiest) if period else exchange_s
    groups = tuple(
        _fitted_island(1, rate, restart, step, n, f.tokens)
        for f, step, n in zip(fits, steps, per_round, strict=True)
    )
    costs = Costs(
        strategy="fleet",
        groups=groups,
        exchange_s=around,
        tokens=island_rounds / len(fits) * sum(g.tokens_per_unit for g in groups),
        job_restart_s=restart,
        checkpoint_interval_s=0.0,
        checkpoint_s=0.0,
        bytes_per_unit=sent,
    )
    names = [d.name for d in dirs]
    kept_work_s = island_rounds * inner * statistics.fmean(steps)
    measured = _fleet_measured(root, names, fits, rounds, kept_work_s)
    measured["interruptions"] = len(recoveries)
    compute_s = statistics.fmean(f.compute_s for f in fits)
    flops = statistics.fmean(f.tokens for f in fits) * fpt / compute_s
    out = _result("fleet", len(fits), params, fpt, flops, costs, measured)
    out["fitted"].update(
        step_s=statistics.fmean(steps),
        round_exchange_s=exchange_s,
        bytes_per_island=sent,  # each member's all-gather: (members - 1) messages
        link_bytes_per_s=sent / exchange_s if exchange_s else 0.0,
        round_period_s=period,
    )
    return out


def _fleet_restarts(dirs: list[Path]) -> tuple[list[float], float]:
    """Seconds each island death cost (down until its restart's recovery ends) and the islands'
    seconds of life, from their events: a fleet island's metrics have no recovery rows, and a
    restart drops the rows its predecessor logged after the last checkpoint."""
    found, lived = [], 0.0
    for d in dirs:
        if (d / "events.jsonl").is_file():
            events = read_events(d)
            found += [s for seconds in restarts(events).values() for s in seconds]
            lived += account(events).island_s
    return found, lived


def _steps_per_round(dirs: list[Path], steps: list[float], inner: int) -> list[int]:
    """Inner steps each island runs per round. On a step budget every island runs H; on a time
    budget (fleet.budget = "seconds:T") each trains for T seconds, so a slow island runs fewer
    steps instead of making the others wait. T over the measured step, not the rows each
    island logged: a restarted island's metrics lose the rows after its last checkpoint, and an
    injected slowdown is not in a step's measured compute."""
    fleet = _read_toml(dirs[0] / "config.toml").get("fleet", {})
    kind, seconds = budget_of(FleetConfig(budget=fleet.get("budget", FleetConfig().budget)))
    if kind != "seconds":
        return [inner] * len(steps)
    return [max(1, math.ceil(seconds / step)) for step in steps]  # it steps until past T


def _round_period(rounds: list[dict]) -> float | None:
    """Median seconds between the commits of consecutive rounds, robust to the few rounds a
    failure stretched; None when rounds.jsonl carries no commit times."""
    times = {r["round"]: r["time"] for r in rounds if isinstance(r.get("time"), int | float)}
    gaps = [times[n] - times[n - 1] for n in times if n - 1 in times]
    return statistics.median(gaps) if gaps else None


def _fleet_measured(
    root: Path, names: list[str], fits: list[IslandFit], rounds: list[dict], kept_work_s: float
) -> dict[str, float]:
    """From goodput.json when the fleet wrote one; else wall time is the busiest island's steps
    plus the exchanges it took part in, and goodput the kept steps over all islands' time."""
    recorded = _read_goodput(root)
    if recorded:
        return {"wall_s": recorded["wall_s"], "goodput": recorded["goodput"]}
    exchange = dict.fromkeys(names, 0.0)
    for r in rounds:
        for member in r["members"]:
            exchange[_island_name(member, names)] += r["exchange_s"]
    wall = max(f.wall_s + exchange[n] for f, n in zip(fits, names, strict=True))
    return {"wall_s": wall, "goodput": kept_work_s / (wall * len(fits))}


def _fitted_island(
    count: int, rate: float, restart_s: float, step_s: float, steps: int, tokens_per_step: float
) -> IslandCosts:
    """The measured machine as island kind: one "chip" per island, failing at the rate seen."""
    return IslandCosts(
        profile="fitted",
        count=count,
        chips=1,
        rate_per_s=rate,
        kinds=(FaultKind("crash", 1.0, 0.0),),
        restart_s=restart_s,
        step_s=step_s,
        steps=steps,
        tokens_per_step=tokens_per_step,
        power_w=0.0,
        price_per_chip_hour=0.0,
    )


def _bytes_per_island(record: dict[str, Any]) -> float:
    """Bytes one member sent in a round: one number, or each member's as the coordinator writes
    them ({"a": 169364, "b": 169364})."""
    sent = record["bytes_sent"]
    values = list(sent.values()) if isinstance(sent, dict) else [sent]
    if not values or not all(isinstance(v, int | float) for v in values):
        raise PlanError(
            f"rounds.jsonl round {record.get('round')}: bytes_sent = {sent!r} must be a number "
            "or a table of member -> number"
        )
    return statistics.fmean(values)


def _work_s(row: dict[str, Any]) -> float:
    """A step's time less its checkpoint stall and recovery: what DESIGN.md counts as work."""
    return row["step_s"] - row["checkpoint_stall_s"] - row["recovery_s"]


def _island_name(member: Any, names: list[str]) -> str:
    """Members are named by their run directory, or numbered in the directories' sorted order."""
    if str(member) in names:
        return str(member)
    if isinstance(member, int) and 0 <= member < len(names):
        return names[member]
    raise PlanError(f"rounds.jsonl: member {member!r} is none of the island directories {names}")


def _result(
    layout: str,
    islands: int,
    params: float,
    fpt: float,
    flops: float,
    costs: Costs,
    measured: dict[str, float],
) -> dict[str, Any]:
    pred, island = expected(costs), costs.groups[0]
    return {
        "layout": layout,
        "islands": islands,
        "params": params,
        "flops_per_token": fpt,
        "fitted": {
            "effective_flops_per_island": flops,
            "step_s": island.step_s,
            "exchange_s": costs.exchange_s,
            "inner_steps": island.steps,
            "mtbf_island_hours": 1 / island.rate_per_s / 3600,
            "recovery_s": island.restart_s,
            "checkpoint_s": costs.checkpoint_s,
            "checkpoint_interval_s": costs.checkpoint_interval_s or None,
        },
        "measured": measured,
        "predicted": {
            "wall_s": pred.wall_s,
            # As the run counts it (faults/goodput.py): step time over all islands' time; the
            # exchange and the wait for a round are losses there, unlike in a plan.
            "goodput": pred.shares["compute"],
            "interruptions": pred.interruptions,
        },
    }


def render_calibration(result: dict[str, Any], console: Console) -> None:
    fitted = Table(
        title=f"fitted machine ({result['layout']} run, {result['islands']} island(s), "
        f"{result['params']:,.0f} parameters)",
        show_header=False,
    )
    for key, value in result["fitted"].items():
        fitted.add_row(key, "-" if value is None else f"{value:,.4g}")
    console.print(fitted)
    table = Table(title="the run predicted back")
    for col in ("", "measured", "predicted", "difference"):
        table.add_column(col, justify="right")
    m, p = result["measured"], result["predicted"]
    table.add_row(
        "wall time (s)",
        f"{m['wall_s']:,.1f}",
        f"{p['wall_s']:,.1f}",
        f"{p['wall_s'] / m['wall_s'] - 1:+.1%}",
    )
    table.add_row(
        "goodput",
        f"{m['goodput']:.1%}",
        f"{p['goodput']:.1%}",
        f"{(p['goodput'] - m['goodput']) * 100:+.1f} pp",
    )
    table.add_row("interruptions", f"{m['interruptions']}", f"{p['interruptions']:.1f}", "")
    console.print(table)


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """The file's records (a line torn by a kill is skipped: ostinato.jsonl), each checked."""
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        missing = [k for k in required if k not in row]
        if missing:
            raise PlanError(
                f"{path}, record {n}: missing {', '.join(missing)}; each line needs "
                f"{', '.join(required)}"
            )
    if not rows:
        raise PlanError(f"{path}: no records; nothing to calibrate on")
    return rows


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PlanError(f"{path}: missing; calibration needs the run's config to size the model")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: not valid TOML: {exc}") from None
