"""`ostinato plan`: the command-line face of the planner."""

# typer reads this signature to build the flags; Optional[...] is kept as the CLI layer expects.
# ruff: noqa: UP045

import inspect
import json
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape

from ostinato.plan import report
from ostinato.plan import scenario as sc
from ostinato.plan.errors import PlanError
from ostinato.plan.fitted import pop_fitted, without

# Scale factors of the run drawn by --plot, relative to the scenario's chip count.
PLOT_FACTORS = [2.0**k for k in range(-4, 5)]


def plan(
    scenario: Optional[str] = None,
    preset: Optional[str] = None,
    sweep: list[str] = [],  # noqa: B006 - typer reads list defaults; never mutated here
    json_out: bool = False,
    plot: Optional[str] = None,
    calibrate: Optional[str] = None,
    deadline_hours: Optional[float] = None,
    price_per_chip_hour: Optional[float] = None,
    overrides: list[str] = [],  # noqa: B006
) -> int:
    """Plan a training run before paying for it: time to train, goodput, failures, energy, cost.

    Describe the run in a scenario TOML file (tables model, hardware, reliability, strategy and
    run), start from a shipped preset (llama3-405b, torchft-l40s, r2-on-ascend, mixed-h100-910c),
    or both, and change any field with --section.key=value overrides, e.g. --hardware.chips=4096
    --strategy.kind=fleet. A preset that reproduces a publication sets some fields from the very
    figures it is compared with; it names them in a [fitted] table, and the answer lists them
    ("fitted" in --json, a note below the tables) until you set them yourself. Three strategies are compared on the same chips: sync (data parallel
    with checkpoint-restart), torchft (per-step fault tolerance) and fleet (ostinato's DiLoCo
    islands with H inner steps, compressed exchanges, and islands that rejoin from a donor).

    Identical islands are hardware.profile, hardware.chips (all of them) and hardware.islands.
    Islands of different kinds are [[islands]] tables of profile, chips (per island) and count,
    each with its own mfu, inter_island_gbit_s, chip_mtbf_hours and price_per_chip_hour if wanted,
    changed with islands.N.key=value. A fleet of such islands runs on a step budget (H steps each;
    fast islands wait for the slowest) or, with strategy.budget="time", on a time budget (each
    island trains as many steps as fit in the slowest island's H, weighted by its tokens).

    The answer comes from a closed form (Young/Daly, expected waste) and a seeded Monte Carlo that
    draws every failure; both are printed. It gives the expected time to train with its 95%
    interval, goodput and where the rest of the time goes, expected interruptions, the optimal
    checkpoint interval (Young, Daly and simulated), the bytes per second each island must send,
    the chance of finishing by --deadline-hours, energy in MWh, and cost at --price-per-chip-hour;
    with several kinds of island, the same per kind.

    --sweep section.key=v1,v2 (repeatable) prints one row per combination; --json prints one JSON
    object; --plot FILE.png draws goodput against scale for each strategy; --calibrate RUN_DIR
    fits the machine an ostinato run (island or fleet directory) ran on and predicts that run back.
    Hardware profiles: h100, h200, h800, h20, a100, b200, l40s, ascend-910b, ascend-910c,
    cloudmatrix-384, cpu-host, or a path such as hardware.profile="path/to/chip.toml".
    """
    console = Console()
    if scenario is not None and scenario.startswith("--"):
        # The CLI hands the first --section.key=value to the optional scenario argument when no
        # scenario file comes before it; no scenario file starts with "--".
        scenario, overrides = None, [scenario.removeprefix("--"), *overrides]
    if calibrate is not None:
        from ostinato.plan.calibrate import calibrate_run, render_calibration

        result = calibrate_run(calibrate)
        _emit(result, json_out, console, lambda: render_calibration(result, console))
        return 0
    raw = sc.read_raw(scenario, preset)
    sweeps = raw.pop("sweep", {})
    if not isinstance(sweeps, dict):
        raise PlanError('[sweep]: must be a table of "section.key" = [values]')
    sweeps.update(dict(sc.parse_sweep(arg) for arg in sweep))
    fitted = pop_fitted(raw, list(overrides))
    raw = sc.apply_overrides(
        raw, list(overrides) + _flag_overrides(deadline_hours, price_per_chip_hour)
    )
    base = sc.build(raw)
    if plot is not None:
        draw_plot(base, plot)
    if sweeps:
        rows = [
            (_point(p), _labelled(report.answer(sc.build(sc.apply_overrides(raw, p))), fitted, p))
            for p in sc.sweep_points(sweeps)
        ]
        _emit(
            {"sweep": [dict(point=p, **r) for p, r in rows]},
            json_out,
            console,
            lambda: report.render_sweep(rows, console),
        )
        return 0
    result = _labelled(report.answer(base), fitted, [])
    _emit(
        result,
        json_out,
        console,
        lambda: report.render(result, console, preset or scenario or "plan"),
    )
    return 0


def _flag_overrides(deadline_hours: Optional[float], price: Optional[float]) -> list[str]:
    flags = []
    if deadline_hours is not None:
        flags.append(f"run.deadline_hours={deadline_hours!r}")
    if price is not None:
        flags.append(f"run.price_per_chip_hour={price!r}")
    return flags


def _labelled(result: dict[str, Any], fitted: dict[str, str], point: list[str]) -> dict[str, Any]:
    """The answer with the preset's fitted fields that this point does not set again: "fitted"
    lists them (--json), "fitted_to" says what each was fitted to (the table view)."""
    left = without(fitted, [o.partition("=")[0] for o in point])
    return {**result, "fitted": sorted(left), "fitted_to": left}


def _point(overrides: list[str]) -> dict[str, Any]:
    return {k: sc.parse_value(v) for k, _, v in (o.partition("=") for o in overrides)}


def _emit(result: dict[str, Any], json_out: bool, console: Console, show) -> None:
    if json_out:
        print(json.dumps(result, indent=None, sort_keys=True))
    else:
        show()


def draw_plot(base: sc.Scenario, path: str) -> None:
    """Goodput (closed form) against the number of chips, one line per strategy."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: the figure only goes to a file
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in sc.STRATEGIES:
        points = report.scale_curve(base, strategy, PLOT_FACTORS)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=strategy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chips")
    ax.set_ylabel("goodput")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    profiles = "+".join(dict.fromkeys(i.profile for i in base.islands))
    ax.set_title(f"goodput against scale: {profiles}, {base.model.params:.3g} parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _reflow(doc: str) -> str:
    """The docstring with each paragraph on one line, so the CLI's help wraps it to the terminal
    instead of breaking it where the source lines end; escaped, as the help is rich markup."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return escape("\n\n".join(" ".join(p.split()) for p in paragraphs))


plan.__doc__ = _reflow(plan.__doc__ or "")
