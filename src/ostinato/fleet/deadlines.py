"""How long a transfer between islands may take: fleet.timeout_s for latency and a slow peer,
plus the payload's bytes at the slower of the assumed floor (fleet.link_floor_mbit_s) and half
the rate the link last measured. No fixed number of seconds suits every model: an 8B model's
int8 pseudo-gradient is 8 GB, 11 minutes at 100 Mbit/s, and a heal moves twice its fp32 size.

A longer deadline does not slow the detection of a death (the transport reports it at once,
fleet/liveness.py) nor of a hang (heartbeats go over their own connection); it only stops a big
exchange on a slow link from being taken for a failed one.
"""

from __future__ import annotations

import math
from typing import Any

from ostinato.config import FleetConfig, exchange_deadline_s

SAFETY = 2.0  # a measured rate is halved: the next transfer may meet a busier link
LARGEST = 1e13  # bytes or bytes per second an island may report: beyond any model or link


def transfer_s(cfg: FleetConfig, nbytes: float, measured_bytes_per_s: float = 0.0) -> float:
    """Seconds `nbytes` may take on the link: at the floor's rate, or slower if measured so."""
    rate = cfg.link_floor_mbit_s * 1e6 / 8
    if measured_bytes_per_s > 0:
        rate = min(rate, measured_bytes_per_s / SAFETY)
    return nbytes / rate


def collective_timeout_s(cfg: FleetConfig, nbytes: float, measured: float = 0.0) -> float:
    """A member's gloo timeout for a collective that moves `nbytes` into it."""
    return cfg.timeout_s + transfer_s(cfg, nbytes, measured)


def exchange_overdue_s(cfg: FleetConfig, nbytes: float, measured: float = 0.0) -> float:
    """When the coordinator aborts an exchange that moves `nbytes` into each member: after
    every member's own collective timeout, so their errors are reported first."""
    return exchange_deadline_s(cfg) + transfer_s(cfg, nbytes, measured)


class LinkRate:
    """The rate the last transfer of this kind measured, bytes per second (0: none yet)."""

    def __init__(self) -> None:
        self.bytes_per_s = 0.0

    def measured(self, nbytes: float, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.bytes_per_s = nbytes / seconds


def bounded(value: Any) -> float:
    """A size or rate an island reported, as a number the coordinator can use: anything not a
    finite number in [0, LARGEST] counts as 0 (no allowance beyond fleet.timeout_s), so a
    member cannot stretch a deadline without bound."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) and 0 <= value <= LARGEST else 0.0
