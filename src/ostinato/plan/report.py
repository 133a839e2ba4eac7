"""The planner's answer to one scenario, as a dict for --json, and its rich rendering."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ostinato.plan.closed_form import LOSSES, WORK, expected
from ostinato.plan.costs import Costs, derive
from ostinato.plan.errors import PlanError
from ostinato.plan.intervals import daly_interval, young_interval
from ostinato.plan.scenario import Scenario, build
from ostinato.plan.simulate import Simulation, best_interval, simulate

# Trials for each point of the simulated checkpoint-interval search: a coarse optimum is enough.
INTERVAL_SEARCH_TRIALS = 100


def answer(scenario: Scenario) -> dict[str, Any]:
    """Everything `ostinato plan` reports for one scenario, in plain JSON-ready values."""
    costs = derive(scenario)
    closed = expected(costs)
    sim = simulate(costs, scenario.run.trials, scenario.run.seed)
    hours = sim.mean_wall_s / 3600
    deadline = scenario.run.deadline_hours
    groups = _groups(costs, sim, hours)
    priced = all(g["cost"] is not None for g in groups)
    out: dict[str, Any] = {
        "strategy": costs.strategy,
        "profile": "+".join(dict.fromkeys(g.profile for g in costs.groups)),
        "chips": costs.chips,
        "islands": costs.islands,
        "time_to_train_hours": hours,
        "time_to_train_ci95_hours": sim.ci95_wall_s / 3600,
        "time_to_train_hours_closed_form": closed.wall_s / 3600,
        "goodput": sim.goodput,
        "goodput_closed_form": closed.goodput,
        "work": {k: sim.shares[k] for k in WORK},
        "losses": {k: sim.shares[k] for k in LOSSES},
        "rounds_committed": sim.committed,
        "interruptions": float(sim.interruptions.mean()),
        "interruptions_closed_form": closed.interruptions,
        "mtbf_failing_unit_hours": _failing_unit_mtbf_s(costs) / 3600,
        "p_finish_by_deadline": sim.p_within(deadline * 3600) if deadline else None,
        "deadline_hours": deadline or None,
        "energy_mwh": sum(g["energy_mwh"] for g in groups),
        "cost": sum(g["cost"] for g in groups) if priced else None,
        "chip_hours": costs.chips * hours,
        "inter_island_bytes_per_s": costs.inter_island_bytes_per_s,
        "step_s": max(g.step_s for g in costs.groups),
        "exchange_s": costs.exchange_s,
        "restart_s": costs.job_restart_s if costs.strategy == "sync" else costs.groups[0].restart_s,
        "budget": scenario.strategy.budget if costs.strategy == "fleet" else None,
        "island_kinds": groups,
        "trials": len(sim.wall_s),
    }
    out.update(_intervals(costs, scenario))
    return out


def _groups(costs: Costs, sim: Simulation, hours: float) -> list[dict[str, Any]]:
    """Per kind of island: its pace, share of the tokens, failures, energy and cost."""
    tokens = sum(g.count * g.tokens_per_unit for g in costs.groups)
    out = []
    for g, failures in zip(costs.groups, sim.group_interruptions, strict=True):
        chip_hours = g.count * g.chips * hours
        price = g.price_per_chip_hour
        out.append(
            {
                "profile": g.profile,
                "count": g.count,
                "chips_per_island": g.chips,
                "step_s": g.step_s,
                "inner_steps": g.steps,
                "busy": g.compute_s / costs.unit_s,  # share of a failure-free unit it computes
                "token_share": g.count * g.tokens_per_unit / tokens,
                "mtbf_island_hours": 1 / g.rate_per_s / 3600,
                "restart_s": g.restart_s,
                "interruptions": failures,
                "energy_mwh": chip_hours * g.power_w / 1e6,
                "cost": chip_hours * price if price else None,
            }
        )
    return out


def _failing_unit_mtbf_s(costs: Costs) -> float:
    """The job's MTBF for sync; otherwise an island's, on average over the islands."""
    if costs.strategy == "sync":
        return 1 / costs.job_rate_per_s
    return costs.islands / costs.job_rate_per_s


def _intervals(costs: Costs, scenario: Scenario) -> dict[str, Any]:
    """Checkpoint intervals: the one used, Young's, Daly's and the simulated best (sync only)."""
    if costs.strategy != "sync":
        return {"checkpoint_interval_s": None}
    mtbf = 1 / costs.job_rate_per_s
    best = best_interval(costs, INTERVAL_SEARCH_TRIALS, scenario.run.seed)
    return {
        "checkpoint_interval_s": costs.checkpoint_interval_s,
        "checkpoint_interval_young_s": young_interval(costs.checkpoint_s, mtbf),
        "checkpoint_interval_daly_s": daly_interval(costs.checkpoint_s, mtbf),
        "checkpoint_interval_simulated_s": best,
    }


def render(result: dict[str, Any], console: Console, title: str = "plan") -> None:
    """One scenario as two tables: the headline figures and where the time goes."""
    kinds = result["island_kinds"]
    hardware = " + ".join(f"{k['count']} x {k['chips_per_island']} {k['profile']}" for k in kinds)
    head = Table(
        title=f"{title}: {result['strategy']} on {result['chips']} chips in "
        f"{result['islands']} island(s) ({hardware})",
        show_header=False,
    )
    head.add_column(style="bold")
    head.add_column(justify="right")
    for label, value in _headline(result):
        head.add_row(label, value)
    console.print(head)
    losses = Table(title="where the time goes (share of all chips' time)")
    losses.add_column("category")
    losses.add_column("share", justify="right")
    losses.add_row("kept work (goodput)", f"{result['goodput']:.1%}")
    for name, share in {**result["work"], **result["losses"]}.items():
        if share > 5e-4:
            losses.add_row(f"  {name}" if name in WORK else name, f"{share:.1%}")
    console.print(losses)
    if len(kinds) > 1:
        _render_kinds(kinds, console)
    _render_fitted(result.get("fitted_to") or {}, console)


def _render_fitted(fitted: dict[str, str], console: Console) -> None:
    """The preset's fields fitted to its source: predicting those figures back is no test."""
    if fitted:
        console.print("fitted to the source's own figures (predicting those is in sample):")
        for key, why in sorted(fitted.items()):
            console.print(f"  {key}: {why}", highlight=False)


def _render_kinds(kinds: list[dict[str, Any]], console: Console) -> None:
    """One column per kind of island, so that a few kinds fit a narrow terminal."""
    table = Table(title="islands by kind")
    table.add_column("")
    for k in kinds:
        table.add_column(f"{k['count']} x {k['chips_per_island']} {k['profile']}", justify="right")
    rows = {
        "inner step": lambda k: f"{k['step_s']:.2f} s",
        "inner steps per round": lambda k: str(k["inner_steps"]),
        "busy (share of a round)": lambda k: f"{k['busy']:.1%}",
        "share of the tokens": lambda k: f"{k['token_share']:.1%}",
        "MTBF of one island": lambda k: _duration(k["mtbf_island_hours"]),
        "interruptions": lambda k: f"{k['interruptions']:,.1f}",
        "energy": lambda k: f"{k['energy_mwh']:,.1f} MWh",
        "cost": lambda k: "-" if k["cost"] is None else f"{k['cost']:,.0f}",
    }
    for label, cell in rows.items():
        table.add_row(label, *(cell(k) for k in kinds))
    console.print(table)


def _headline(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            "time to train",
            f"{_duration(r['time_to_train_hours'])} ± "
            f"{_duration(r['time_to_train_ci95_hours'])} (closed form "
            f"{_duration(r['time_to_train_hours_closed_form'])})",
        ),
        ("goodput", f"{r['goodput']:.1%} (closed form {r['goodput_closed_form']:.1%})"),
        (
            "interruptions",
            f"{r['interruptions']:.1f} (closed form {r['interruptions_closed_form']:.1f})",
        ),
        ("MTBF of a failing unit", _duration(r["mtbf_failing_unit_hours"])),
        ("inter-island bytes/s per island", _bytes(r["inter_island_bytes_per_s"]) + "/s"),
        ("energy", f"{r['energy_mwh']:,.1f} MWh"),
        ("cost", "give --price-per-chip-hour" if r["cost"] is None else f"{r['cost']:,.0f}"),
    ]
    if r["checkpoint_interval_s"] is not None:
        rows.append(
            (
                "checkpoint interval",
                f"{r['checkpoint_interval_s']:.0f} s (Young "
                f"{r['checkpoint_interval_young_s']:.0f} s, Daly "
                f"{r['checkpoint_interval_daly_s']:.0f} s, simulated best "
                f"{r['checkpoint_interval_simulated_s']:.0f} s)",
            )
        )
    if r["rounds_committed"] is not None:
        rows.append(("steps or rounds committed", f"{r['rounds_committed']:.1%}"))
    if r["p_finish_by_deadline"] is not None:
        rows.append(
            (f"P(done within {r['deadline_hours']:g} h)", f"{r['p_finish_by_deadline']:.1%}")
        )
    return rows


def render_sweep(rows: list[tuple[dict[str, Any], dict[str, Any]]], console: Console) -> None:
    """One line per swept combination: the swept values, then the headline figures."""
    keys = list(rows[0][0])
    table = Table(title="sweep")
    for key in keys:
        table.add_column(key.rsplit(".", 1)[-1])
    for col in ("hours", "goodput", "interruptions", "P(deadline)", "MWh", "cost"):
        table.add_column(col, justify="right")
    for point, r in rows:
        p = r["p_finish_by_deadline"]
        table.add_row(
            *(str(point[k]) for k in keys),
            f"{r['time_to_train_hours']:,.1f}",
            f"{r['goodput']:.1%}",
            f"{r['interruptions']:,.1f}",
            "-" if p is None else f"{p:.1%}",
            f"{r['energy_mwh']:,.1f}",
            "-" if r["cost"] is None else f"{r['cost']:,.0f}",
        )
    console.print(table)
    fitted = rows[0][1].get("fitted_to") or {}  # the fields no point of the sweep sets again
    _render_fitted(
        {k: v for k, v in fitted.items() if all(k in r["fitted"] for _, r in rows)}, console
    )


def scale_curve(scenario: Scenario, strategy: str, factors: list[float]) -> list[tuple[int, float]]:
    """(chips, closed-form goodput) as the run grows by adding islands of each kind in proportion;
    a single island is first cut into 8. Points that make no sense (an island too small for the
    model) are left out."""
    raw = scenario.to_raw()
    raw["strategy"]["kind"] = strategy
    kinds = raw["islands"]
    if scenario.island_count == 1:
        kinds[0].update(chips=max(1, kinds[0]["chips"] // 8), count=8)
    base = [k["count"] for k in kinds]
    points = []
    for f in factors:
        counts = [max(1, round(n * f)) for n in base]
        counts[0] = max(counts[0], 2 - sum(counts[1:]))  # islands recover from one another
        for kind, n in zip(kinds, counts, strict=True):
            kind["count"] = n
        try:
            s = build(raw)
            points.append((s.chips, expected(derive(s)).goodput))
        except PlanError:
            continue
    return points


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:,.1f} days"
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:,.1f} min"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"
