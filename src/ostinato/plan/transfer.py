"""Out of sample: the machine fitted on one recorded fleet run predicts another run.

`plan --calibrate` fits a run and predicts that same run back, which tests little: every figure
it predicts was measured in it. Here the fit of run A predicts run B, which differs in what a
plan changes: the island count and the failure rate (another storm). From A we keep what belongs
to the machine: the step, the inner steps per round, the restart, one member's message and the
link's bytes per second, and the seconds of a round outside its steps and its all-gather; from B
only what a planner is given: its islands, rounds and failure rate.
"""

from __future__ import annotations

from typing import Any

from ostinato.plan.closed_form import expected
from ostinato.plan.costs import Costs, FaultKind, IslandCosts


def predict(fit: dict[str, Any], islands: int, rounds: int, rate_scale: float) -> dict[str, float]:
    """Run B from `fit`, the result of calibrate_run on a fleet run A: B has `islands` islands,
    `rounds` rounds, and each island fails `rate_scale` times as often as A's did."""
    if fit.get("layout") != "fleet":
        raise ValueError("predict: needs the calibration of a fleet run (layout = fleet)")
    if islands < 2 or rounds < 1 or rate_scale < 0:
        raise ValueError(f"predict: islands {islands} (>= 2), rounds {rounds} (>= 1), "
                         f"rate_scale {rate_scale} (>= 0)")  # fmt: skip
    f = fit["fitted"]
    message = f["bytes_per_island"] / (fit["islands"] - 1)  # an all-gather: one per peer
    link = f["link_bytes_per_s"]

    def gather_s(n: int) -> float:
        return (n - 1) * message / link if link else 0.0

    around = max(0.0, f["exchange_s"] - gather_s(fit["islands"])) + gather_s(islands)
    group = IslandCosts(
        profile="fitted",
        count=islands,
        chips=1,
        rate_per_s=rate_scale / (f["mtbf_island_hours"] * 3600),
        kinds=(FaultKind("crash", 1.0, 0.0),),
        restart_s=f["recovery_s"],
        step_s=f["step_s"],
        steps=f["inner_steps"],
        tokens_per_step=1.0,  # tokens count in steps here: only their ratio matters
        power_w=0.0,
        price_per_chip_hour=0.0,
    )
    costs = Costs(
        strategy="fleet",
        groups=(group,),
        exchange_s=around,
        tokens=float(rounds * islands * f["inner_steps"]),
        job_restart_s=f["recovery_s"],
        checkpoint_interval_s=0.0,
        checkpoint_s=0.0,
        bytes_per_unit=(islands - 1) * message,
    )
    outcome = expected(costs)
    # goodput as the run counts it (calibrate.py): step time over all islands' time
    return {
        "wall_s": outcome.wall_s,
        "goodput": outcome.shares["compute"],
        "interruptions": outcome.interruptions,
    }
