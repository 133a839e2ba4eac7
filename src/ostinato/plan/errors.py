"""The planner's one user-error type, so the CLI can turn every bad input into exit code 2."""


class PlanError(ValueError):
    """A scenario, profile, preset or run directory the planner cannot use; the message says why."""
