"""The planner's answer to one scenario, as a dict for --json, and its rich rendering."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ostinato.plan.chips import load_profile
from ostinato.plan.closed_form import LOSSES, WORK, daly_interval, expected, young_interval
from ostinato.plan.costs import derive
from ostinato.plan.scenario import Scenario
from ostinato.plan.simulate import best_interval, simulate

# Trials for each point of the simulated checkpoint-interval search: a coarse optimum is enough.
INTERVAL_SEARCH_TRIALS = 100


def answer(scenario: Scenario) -> dict[str, Any]:
    """Everything `ostinato plan` reports for one scenario, in plain JSON-ready values."""
    profile = load_profile(scenario.hardware.profile)
    costs = derive(scenario, profile)
    closed = expected(costs)
    sim = simulate(costs, scenario.run.trials, scenario.run.seed)
    hours = sim.mean_wall_s / 3600
    chip_hours = costs.chips * hours
    deadline = scenario.run.deadline_hours
    price = scenario.run.price_per_chip_hour
    out: dict[str, Any] = {
        "strategy": costs.strategy,
        "profile": profile.name,
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
        "mtbf_failing_unit_hours": 1 / costs.unit_rate_per_s / 3600,
        "p_finish_by_deadline": sim.p_within(deadline * 3600) if deadline else None,
        "deadline_hours": deadline or None,
        "energy_mwh": chip_hours * profile.power_w / 1e6,
        "cost": chip_hours * price if price else None,
        "chip_hours": chip_hours,
        "inter_island_bytes_per_s": costs.inter_island_bytes_per_s,
        "step_s": costs.step_s,
        "exchange_s": costs.exchange_s,
        "restart_s": costs.restart_s,
        "trials": len(sim.wall_s),
    }
    out.update(_intervals(costs, scenario))
    return out


def _intervals(costs, scenario: Scenario) -> dict[str, Any]:
    """Checkpoint intervals: the one used, Young's, Daly's and the simulated best (sync only)."""
    if costs.strategy != "sync":
        return {"checkpoint_interval_s": None}
    mtbf = 1 / costs.unit_rate_per_s
    best = best_interval(costs, INTERVAL_SEARCH_TRIALS, scenario.run.seed)
    return {
        "checkpoint_interval_s": costs.checkpoint_interval_s,
        "checkpoint_interval_young_s": young_interval(costs.checkpoint_s, mtbf),
        "checkpoint_interval_daly_s": daly_interval(costs.checkpoint_s, mtbf),
        "checkpoint_interval_simulated_s": best,
    }


def render(result: dict[str, Any], console: Console, title: str = "plan") -> None:
    """One scenario as two tables: the headline figures and where the time goes."""
    head = Table(
        title=f"{title}: {result['strategy']} on {result['chips']} {result['profile']}"
        f" in {result['islands']} island(s)",
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


def scale_curve(scenario: Scenario, strategy: str, factors: list[float]) -> list[tuple[int, float]]:
    """(chips, closed-form goodput) as the run grows with islands of a fixed size; points that
    make no sense (an island too small for the model) are left out."""
    from ostinato.plan.errors import PlanError
    from ostinato.plan.scenario import build

    hw = scenario.hardware
    per_island = hw.chips // hw.islands if hw.islands > 1 else max(1, hw.chips // 8)
    points = []
    for f in factors:
        islands = max(2, round(hw.chips * f / per_island))
        raw = scenario.to_dict()
        raw["hardware"].update(chips=islands * per_island, islands=islands)
        raw["strategy"]["kind"] = strategy
        try:
            points.append((islands * per_island, expected(derive(build(raw))).goodput))
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
