"""The round clock of a time budget counts inner work: not the time a process takes to join."""

from types import SimpleNamespace

import pytest

from ostinato.fleet import island
from ostinato.fleet.island import FleetIsland, RoundClock

pytestmark = pytest.mark.timeout(30)


def test_a_process_first_round_starts_at_its_first_step_not_when_it_began_joining(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(island.time, "perf_counter", lambda: now[0])
    beats = []
    fleet = SimpleNamespace(
        clock=RoundClock(),
        member=SimpleNamespace(
            heartbeat=SimpleNamespace(progress=beats.append), serve_asked_heal=lambda: None
        ),
    )
    now[0] += 5.0  # joining, being healed, setting up: not the round's inner work
    assert fleet.clock.seconds() == 0.0
    FleetIsland.training(fleet, 0)
    now[0] += 0.25
    fleet.clock.add(128)
    FleetIsland.training(fleet, 1)  # a later step does not restart the round
    now[0] += 0.5
    assert fleet.clock.seconds() == 0.75 and beats == [0, 1]
    fleet.clock.reset()  # the round ended: the next one starts now
    now[0] += 0.125
    assert fleet.clock.seconds() == 0.125 and fleet.clock.last_steps == 1
