"""Calibration: fit the machine a recorded ostinato run ran on, then predict that run back.

Two layouts are read. An island run directory holds metrics.jsonl (one object per inner step:
step, step_s, compute_s, checkpoint_stall_s, recovery_s, tokens, ...) and config.toml. A fleet
directory holds one such run directory per island plus rounds.jsonl (one object per committed
round: round, attempt, members, bytes_sent, exchange_s, tokens, digest) and, optionally,
goodput.json (`goodput` and island-seconds per category), which then is the measured goodput.
The fitted machine treats each island as one "chip" whose peak is the measured FLOP/s.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ostinato.plan.closed_form import expected
from ostinato.plan.costs import Costs, FaultKind
from ostinato.plan.errors import PlanError

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
    return IslandFit(
        rows=len(rows),
        kept=len(last_seen),
        compute_s=statistics.fmean(r["compute_s"] for r in rows),
        overhead_s=max(0.0, statistics.fmean(r["step_s"] - r["compute_s"] for r in plain)),
        tokens=statistics.fmean(r["tokens"] for r in rows),
        wall_s=sum(r["step_s"] for r in rows),
        kept_work_s=sum(_work_s(rows[i]) for i in last_seen.values()),
        recoveries=[r["recovery_s"] for r in rows if r["recovery_s"] > 0],
        stalls=[r["checkpoint_stall_s"] for r in rows if r["checkpoint_stall_s"] > 0],
    )


def _calibrate_island(root: Path) -> dict[str, Any]:
    params, fpt = model_size(root / "config.toml")
    fit = fit_island(root / "metrics.jsonl")
    unit_s = fit.compute_s + fit.overhead_s
    progress = fit.kept * unit_s
    costs = Costs(
        strategy="sync",
        chips=1,
        islands=1,
        failing_units=1,
        unit_rate_per_s=len(fit.recoveries) / fit.wall_s or NO_FAILURE_RATE,
        kinds=(FaultKind("crash", 1.0, 0.0),),
        restart_s=statistics.fmean(fit.recoveries) if fit.recoveries else 0.0,
        step_s=fit.compute_s,
        exchange_s=fit.overhead_s,
        inner_steps=1,
        units_needed=fit.kept,
        checkpoint_interval_s=progress / len(fit.stalls) if fit.stalls else progress,
        checkpoint_s=statistics.fmean(fit.stalls) if fit.stalls else 0.0,
        bytes_per_unit=0.0,
        power_w=0.0,
        price_per_chip_hour=0.0,
    )
    measured = {
        "wall_s": fit.wall_s,
        "goodput": fit.kept_work_s / fit.wall_s,
        "interruptions": len(fit.recoveries),
    }
    return _result("island", 1, params, fpt, fit.tokens * fpt / fit.compute_s, costs, measured)


def _calibrate_fleet(root: Path, dirs: list[Path]) -> dict[str, Any]:
    params, fpt = model_size(dirs[0] / "config.toml")
    fits = [fit_island(d / "metrics.jsonl") for d in dirs]
    rounds = _read_jsonl(root / "rounds.jsonl", ("round", "members", "bytes_sent", "exchange_s"))
    island_rounds = sum(len(r["members"]) for r in rounds)
    # Rows, not distinct steps: an island healed from a donor may number its steps afresh.
    inner = max(1, round(sum(f.rows for f in fits) / island_rounds))
    exchange_s = statistics.fmean(r["exchange_s"] for r in rounds)
    link = statistics.fmean(r["bytes_sent"] for r in rounds) / exchange_s if exchange_s else 0.0
    recoveries = [s for f in fits for s in f.recoveries]
    compute_s = statistics.fmean(f.compute_s for f in fits)
    overhead_s = statistics.fmean(f.overhead_s for f in fits)
    costs = Costs(
        strategy="fleet",
        chips=len(fits),
        islands=len(fits),
        failing_units=len(fits),
        unit_rate_per_s=len(recoveries) / sum(f.wall_s for f in fits) or NO_FAILURE_RATE,
        kinds=(FaultKind("crash", 1.0, 0.0),),
        restart_s=statistics.fmean(recoveries) if recoveries else 0.0,
        # Per-step overheads (data, logging) are time in the round that is not compute.
        step_s=compute_s,
        exchange_s=exchange_s + inner * overhead_s,
        inner_steps=inner,
        units_needed=island_rounds,
        checkpoint_interval_s=0.0,
        checkpoint_s=0.0,
        bytes_per_unit=statistics.fmean(r["bytes_sent"] for r in rounds),
        power_w=0.0,
        price_per_chip_hour=0.0,
    )
    names = [d.name for d in dirs]
    kept_work_s = island_rounds * inner * (compute_s + overhead_s)
    measured = _fleet_measured(root, names, fits, rounds, kept_work_s)
    measured["interruptions"] = len(recoveries)
    flops = statistics.fmean(f.tokens for f in fits) * fpt / compute_s
    out = _result("fleet", len(fits), params, fpt, flops, costs, measured)
    out["fitted"].update(round_exchange_s=exchange_s, link_bytes_per_s=link)
    return out


def _fleet_measured(
    root: Path, names: list[str], fits: list[IslandFit], rounds: list[dict], kept_work_s: float
) -> dict[str, float]:
    """Wall time: the busiest island's steps plus the exchanges it took part in. Goodput: from
    goodput.json when the fleet wrote one, else the kept work (the steps of committed rounds and
    their exchanges) over all islands' time."""
    exchange = dict.fromkeys(names, 0.0)
    for r in rounds:
        for member in r["members"]:
            exchange[_island_name(member, names)] += r["exchange_s"]
    wall = max(f.wall_s + exchange[n] for f, n in zip(fits, names, strict=True))
    goodput_file = root / "goodput.json"
    if goodput_file.is_file():
        goodput = float(json.loads(goodput_file.read_text())["goodput"])
    else:
        goodput = (kept_work_s + sum(exchange.values())) / (wall * len(fits))
    return {"wall_s": wall, "goodput": goodput}


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
    pred = expected(costs)
    return {
        "layout": layout,
        "islands": islands,
        "params": params,
        "flops_per_token": fpt,
        "fitted": {
            "effective_flops_per_island": flops,
            "step_s": costs.step_s,
            "exchange_s": costs.exchange_s,
            "inner_steps": costs.inner_steps,
            "mtbf_island_hours": 1 / costs.unit_rate_per_s / 3600,
            "recovery_s": costs.restart_s,
            "checkpoint_s": costs.checkpoint_s,
            "checkpoint_interval_s": costs.checkpoint_interval_s or None,
        },
        "measured": measured,
        "predicted": {
            "wall_s": pred.wall_s,
            "goodput": pred.goodput,
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
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}:{n}: not JSON ({exc})") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise PlanError(
                f"{path}:{n}: missing {', '.join(missing)}; each line needs {', '.join(required)}"
            )
        rows.append(row)
    if not rows:
        raise PlanError(f"{path}: empty; nothing to calibrate on")
    return rows


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PlanError(f"{path}: missing; calibration needs the run's config to size the model")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: not valid TOML: {exc}") from None
