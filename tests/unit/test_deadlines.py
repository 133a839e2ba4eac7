"""Deadlines of transfers between islands follow their size and the link (fleet/deadlines.py)."""

import math

import pytest

from ostinato.config import load_config
from ostinato.fleet.deadlines import (
    LinkRate,
    bounded,
    collective_timeout_s,
    exchange_overdue_s,
    transfer_s,
)

pytestmark = pytest.mark.timeout(30)


def fleet(*overrides: str):
    return load_config(None, [f"fleet.{o}" for o in overrides]).fleet


def test_a_payload_may_take_its_bytes_at_the_floor_rate_on_top_of_the_timeout():
    cfg = fleet("timeout_s=20", "link_floor_mbit_s=100")
    eight_gb = 8e9  # an 8B model's int8 pseudo-gradient from one other member
    assert transfer_s(cfg, eight_gb) == pytest.approx(640.0)  # 8e9 B * 8 / 1e8 bit/s
    assert collective_timeout_s(cfg, eight_gb) == pytest.approx(660.0)
    assert collective_timeout_s(cfg, 0) == 20.0  # a tiny model: as before
    # the coordinator's deadline stays above every member's own timeout (their errors first)
    assert exchange_overdue_s(cfg, eight_gb) > collective_timeout_s(cfg, eight_gb)


def test_a_link_measured_slower_than_the_floor_stretches_the_deadline_never_shrinks_it():
    cfg = fleet("timeout_s=20", "link_floor_mbit_s=100")  # 12.5 MB/s
    slow, fast = 2e6, 1e9  # bytes per second measured
    assert transfer_s(cfg, 1e8, slow) == pytest.approx(1e8 / (slow / 2))  # halved: margin
    assert transfer_s(cfg, 1e8, fast) == transfer_s(cfg, 1e8)  # the floor still holds
    rate = LinkRate()
    rate.measured(4e6, 2.0)
    assert rate.bytes_per_s == slow
    rate.measured(0, 0.0)  # nothing moved: nothing learned
    assert rate.bytes_per_s == slow


@pytest.mark.parametrize(
    ("reported", "used"),
    [(1e6, 1e6), (0, 0.0), (-5, 0.0), (math.inf, 0.0), (math.nan, 0.0), (1e20, 0.0),
     ("1e9", 0.0), (True, 0.0), (None, 0.0), ([1], 0.0)],
)  # fmt: skip
def test_a_size_or_rate_an_island_reports_is_bounded(reported, used):
    assert bounded(reported) == used


def test_the_floor_must_be_positive_and_is_named():
    with pytest.raises(ValueError, match="fleet.link_floor_mbit_s"):
        fleet("link_floor_mbit_s=0")
