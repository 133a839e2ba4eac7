"""Plan before you spend: time to train, goodput, failures, energy and cost of a run at any scale.

chips (hardware profiles) -> scenario (what to train, on what, how) -> costs (unit costs of one
strategy) -> closed_form (expected values) and simulate (Monte Carlo) -> report / command.
calibrate fits the machine of a recorded ostinato run and predicts that run back.
"""

from ostinato.plan.command import plan
from ostinato.plan.errors import PlanError

__all__ = ["PlanError", "plan"]
