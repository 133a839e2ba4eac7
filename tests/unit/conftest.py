"""Fixtures of the unit tests that drive a coordinator by hand."""

from __future__ import annotations

from typing import Any

import pytest

from ostinato.config import GuardsConfig
from ostinato.fleet.coordinator import Coordinator
from tests.unit.test_coordinator import fleet_cfg


@pytest.fixture
def make_coordinator(tmp_path):
    """Coordinators on free ports, all logging to the same run directory (as after a restart)."""
    made: list[Coordinator] = []

    def make(guards: GuardsConfig | None = None, **overrides: Any) -> Coordinator:
        coordinator = Coordinator("127.0.0.1:0", fleet_cfg(**overrides), tmp_path, guards)
        coordinator.slow_tick_s = 0.0  # every tick does everything: the tests step it by hand
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        coordinator.close()
