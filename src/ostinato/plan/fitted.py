"""Figures a preset fitted to its source, so that a prediction of them is not taken for a test.

A preset that reproduces a publication sets some fields from the very figures it is compared
with (the token count from the reported days, a failure rate from the reported interruptions).
It names them in a `[fitted]` table of `"section.key" = "what it was fitted to"`; `plan --json`
lists them under "fitted" and the table view prints them. A field the user sets again (in a
scenario file over the preset, an override or a sweep) is the user's figure, no longer fitted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ostinato.plan.errors import PlanError
from ostinato.plan.scenario import ISLAND_KEYS, SECTIONS

TABLE = "fitted"


def pop_fitted(raw: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Take the [fitted] table out of `raw` (build() knows no such section), check that it names
    real fields, and leave out those that `overrides` set again."""
    table = raw.pop(TABLE, {})
    if not isinstance(table, dict):
        raise PlanError('[fitted]: must be a table of "section.key" = "what it was fitted to"')
    errors = [_problem(key, why) for key, why in table.items()]
    if any(errors):
        raise PlanError("[fitted]: " + "; ".join(e for e in errors if e))
    return without(table, [o.removeprefix("--").partition("=")[0] for o in overrides])


def without(fitted: dict[str, str], keys: list[str]) -> dict[str, str]:
    """The fitted fields less `keys` (fields the user set again)."""
    return {k: why for k, why in fitted.items() if k not in keys}


def _problem(key: Any, why: Any) -> str:
    if not isinstance(why, str) or not why.strip():
        return f"{key!r} needs a string saying what it was fitted to"
    parts = str(key).split(".")
    if len(parts) == 3 and parts[0] == "islands" and parts[1].isdigit() and parts[2] in ISLAND_KEYS:
        return ""
    section = SECTIONS.get(parts[0]) if len(parts) == 2 else None
    if section is None or parts[1] not in {f.name for f in dataclasses.fields(section)}:
        return f"{key!r} is no field of a scenario (section.key, or islands.N.key)"
    return ""
