"""Link emulation: make one island's cross-island traffic behave like a slow, lossy link.

The exchange runs on loopback at memory speed; afterwards the member sleeps for whatever the
emulated link would have taken beyond the real time. Heartbeats do not pass through it, which is
the point: a saturated bulk link must not make a healthy island look dead.

Nothing in production shapes its own link: the `link` fault (faults/inject.py) hands a Link's
`pad` to the member as its `pad_exchange`. Values are SI units: seconds, bits per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0
    bits_per_s: float = float("inf")
    loss: float = 0.0

    def seconds_for(self, bytes_out: int, bytes_in: int) -> float:
        """Time to push `bytes_out` and pull `bytes_in` through the link (one round trip)."""
        if self.bits_per_s == float("inf") and self.latency_s == 0:
            return 0.0
        transfer = 8 * (bytes_out + bytes_in) / self.bits_per_s
        return 2 * self.latency_s + transfer / (1.0 - self.loss)  # lost packets are sent again

    def pad(self, started: float, bytes_out: int, bytes_in: int) -> None:
        """Sleep so the exchange begun at `started` lasts as long as on the emulated link."""
        remaining = self.seconds_for(bytes_out, bytes_in) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
