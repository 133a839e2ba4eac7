"""The `ostinato` command: a thin map from command names to typed functions.

Each command's docstring is its --help. A failure the user can act on ends with a one-paragraph
message and the exit code of its kind (ostinato.errors): 2 bad input (a bad config, a missing
file, an unusable checkpoint), 3 refused by the fleet, 4 an unreachable peer; --debug shows the
traceback. Exit code 1 is a bug, with its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ostinato.cli_support import OVERRIDES, Debug, parse_overrides, user_errors
from ostinato.errors import EXIT_CODES_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__.splitlines()[0],
    epilog=EXIT_CODES_HELP,
)


@app.command(context_settings=OVERRIDES)
@user_errors
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="TOML recipe, e.g. configs/demo.toml.")],
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/<recipe name>).")
    ] = None,
    resume: Annotated[
        str, typer.Option(help="auto, none, a run directory or a checkpoint.")
    ] = "auto",
    debug: Debug = False,
) -> None:
    """Train a model on one island (one process, or every rank under torchrun).

    Any config field can be overridden as --section.key=value, e.g. --train.steps=200.
    The run directory gets config.toml, metrics.jsonl, tokenizer.json and checkpoints/.
    """
    from ostinato.config import load_config
    from ostinato.faults.inject import step_hooks
    from ostinato.train.report import print_result
    from ostinato.train.trainer import train as run_training

    cfg = load_config(config, parse_overrides(ctx.args))
    hooks = step_hooks(cfg)  # faults.schedule, injected through the trainer's step hooks
    result = run_training(cfg, out or Path("runs") / config.stem, resume, hooks=hooks)
    if int(os.environ.get("RANK", "0")) == 0:
        print_result(result)


@app.command()
@user_errors
def doctor(debug: Debug = False) -> None:
    """Print the devices, backends and versions found here, and what training would use."""
    from ostinato.train.report import print_doctor

    print_doctor()


fleet_app = typer.Typer(no_args_is_help=True, help="Train one model on several islands (DiLoCo).")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("coordinator", context_settings=OVERRIDES)
@user_errors
def fleet_coordinator(
    ctx: typer.Context,
    bind: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (port 0: any free).")
    ] = "127.0.0.1:29400",
    out: Annotated[Path | None, typer.Option(help="Directory for rounds.jsonl.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Recipe whose [fleet] section to use.")
    ] = None,
    debug: Debug = False,
) -> None:
    """Run the fleet coordinator: membership, rounds and commits; it holds no model state.

    Islands join with `ostinato train ... --fleet.coordinator HOST:PORT --fleet.island NAME`.
    Only islands presenting the fleet token (--fleet.token or OSTINATO_FLEET_TOKEN) are admitted.
    """
    from ostinato.config import load_config
    from ostinato.fleet.coordinator import Coordinator
    from ostinato.fleet.island import recipe_fingerprint
    from ostinato.fleet.wire import fleet_token

    full = load_config(config, parse_overrides(ctx.args))
    if not fleet_token(full.fleet.token):
        raise ValueError(
            "the coordinator needs a fleet token: set OSTINATO_FLEET_TOKEN or --fleet.token"
        )
    recipe = recipe_fingerprint(full.model, full.fleet, full.train.steps) if config else None
    coordinator = Coordinator(bind, full.fleet, out, full.guards, recipe)
    print(f"coordinator on {bind.rpartition(':')[0]}:{coordinator.port}", flush=True)
    coordinator.run()


@fleet_app.command("status")
@user_errors
def fleet_status(
    address: Annotated[str, typer.Argument(help="HOST:PORT of the coordinator.")],
    token: Annotated[str, typer.Option(help="Fleet token (default OSTINATO_FLEET_TOKEN).")] = "",
    debug: Debug = False,
) -> None:
    """Print the fleet's islands (training, syncing, recovering, gone), speeds and last round."""
    from ostinato.fleet.report import print_status

    print_status(address, token)


@fleet_app.command("local", context_settings=OVERRIDES)
@user_errors
def fleet_local(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="TOML recipe for every island.")],
    out: Annotated[Path, typer.Option(help="Fleet directory: one run directory per island.")],
    islands: Annotated[int, typer.Option(help="Number of islands.")] = 2,
    names: Annotated[
        str | None, typer.Option(help="Island names, comma-separated (default a,b,c...).")
    ] = None,
    resume: Annotated[
        str, typer.Option(help="none: a fresh fleet; auto: from the fleet checkpoint.")
    ] = "none",
    for_island: Annotated[
        list[str] | None,
        typer.Option("--for", help="ISLAND:section.key=value for one island only."),
    ] = None,
    max_restarts: Annotated[int, typer.Option(help="Restarts of a crashed island.")] = 3,
    warm_spare: Annotated[
        bool, typer.Option(help="Keep a process with the trainer imported for the next restart.")
    ] = True,
    ranks: Annotated[
        str | None,
        typer.Option(help="Ranks of each island, comma-separated, e.g. 2,1 (torchrun; default 1)."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Run a whole fleet on this machine: a coordinator and one process per island (or, with
    --ranks, one torchrun per island of several ranks).

    Every --section.key=value goes to all islands (and --fleet.* also to the coordinator);
    --for b:train.threads=1 changes island b only. An island that dies or exits 1 or 4 (an
    unreachable peer) is restarted, up to --max-restarts; one that exits 2 (bad input) or 3
    (refused by the fleet) would fail again, so the fleet stops and exits with that code.
    Exits 0 when the run completes, 1 (or the islands' 4) when an island ran out of restarts.
    """
    from ostinato.config import load_config
    from ostinato.fleet.local import LocalFleet, island_names, island_ranks, parse_per_island

    overrides = parse_overrides(ctx.args)
    load_config(config, overrides)  # refuse a bad config before starting anything
    chosen = island_names(islands, names)
    per_island = parse_per_island(for_island or [], chosen)
    fleet = LocalFleet(config, out, chosen, overrides, per_island, resume, max_restarts, warm_spare)
    fleet.ranks = island_ranks(ranks, chosen)
    raise typer.Exit(fleet.run())


@app.command(context_settings=OVERRIDES)
@user_errors
def chaos(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(help="TOML recipe for every island.")],
    out: Annotated[Path, typer.Option(help="Fleet directory; chaos.json is written here.")],
    faults: Annotated[
        str,
        typer.Option(
            help="Schedule, e.g. 'crash@island=b,step=40; nan@step=70' or 'storm:mtbf=30s,seed=7'."
        ),
    ],
    islands: Annotated[int, typer.Option(help="Number of islands.")] = 3,
    names: Annotated[
        str | None, typer.Option(help="Island names, comma-separated (default a,b,c...).")
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            help="First run the fault-free fleet on 3 train seeds (a step budget: equal "
            "tokens), for reference_loss and its spread."
        ),
    ] = False,
    for_island: Annotated[
        list[str] | None,
        typer.Option("--for", help="ISLAND:section.key=value for one island only."),
    ] = None,
    debug: Debug = False,
) -> None:
    """Run a local fleet under a fault schedule and print a survival table.

    Crashes are SIGKILLs and hangs SIGSTOPs sent from outside; nan, bitflip, spike, slow and link
    strike from inside the island. Each fault is matched with the guard that caught it, in
    DIR/chaos.json. Exits 1 if a fault went undetected or the islands end with different
    parameters. Any --section.key=value goes to every island (--fleet.* also to the coordinator).
    An RL recipe (rl.init set) runs `ostinato rl` instead, its rollout islands struck by
    crash@island=rI,step=N and hang@island=rI,step=N.
    """
    from ostinato.config import load_config
    from ostinato.faults.chaos import chaos as run_chaos
    from ostinato.fleet.local import island_names, parse_per_island

    overrides = parse_overrides(ctx.args)
    cfg = load_config(config, overrides)  # refuse a bad config before starting anything
    if cfg.rl.init:  # an RL recipe: its rollout islands are struck (rl.rollout_islands)
        from ostinato.rl.chaos import rl_chaos
        from ostinato.rl.command import explicit_sections

        raise typer.Exit(rl_chaos(cfg, out, faults, explicit_sections(config, overrides)))
    chosen = island_names(islands, names)
    per_island = parse_per_island(for_island or [], chosen)
    code = run_chaos(config, out, chosen, faults, overrides, per_island, compare, cfg)
    raise typer.Exit(code)


@app.command(context_settings=OVERRIDES)
@user_errors
def plan(
    ctx: typer.Context,
    scenario: Annotated[str | None, typer.Argument(help="Scenario TOML file.")] = None,
    preset: Annotated[
        str | None, typer.Option(help="llama3-405b, torchft-l40s, r2-on-ascend.")
    ] = None,
    sweep: Annotated[
        list[str] | None, typer.Option(help="section.key=v1,v2,... (repeatable).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[
        str | None, typer.Option(help="Draw goodput against scale to FILE.png.")
    ] = None,
    calibrate: Annotated[
        str | None, typer.Option(help="Fit and predict back a measured run.")
    ] = None,
    deadline_hours: Annotated[float | None, typer.Option(help="Deadline for P(finish).")] = None,
    price_per_chip_hour: Annotated[float | None, typer.Option(help="Price for the cost.")] = None,
    debug: Debug = False,
) -> None:
    from ostinato.plan.command import plan as run_plan

    code = run_plan(
        scenario,
        preset,
        sweep or [],
        json_out,
        plot,
        calibrate,
        deadline_hours,
        price_per_chip_hour,
        parse_overrides(ctx.args),
    )
    raise typer.Exit(code)


def _planner_help() -> str:
    from ostinato.plan.command import plan as run_plan

    return run_plan.__doc__ or ""


plan.__doc__ = _planner_help()


from ostinato.serve.commands import register as register_serving  # noqa: E402

register_serving(app)

from ostinato.rl.command import register as register_rl  # noqa: E402
from ostinato.rl.command import run_rollout_island  # noqa: E402

register_rl(app)


def main() -> None:
    if sys.argv[1:3] == ["rl", "rollout"]:  # a subcommand of a command that takes overrides
        run_rollout_island(sys.argv[3:])
        return
    app(prog_name="ostinato")


if __name__ == "__main__":
    sys.exit(main())
