"""Link emulation: make one island's cross-island traffic behave like a slow, lossy link.

The exchange runs on loopback at memory speed; afterwards the member sleeps for whatever the
emulated link would have taken beyond the real time. Heartbeats do not pass through it, which is
the point: a saturated bulk link must not make a healthy island look dead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ostinato.faults.spec import parse_bandwidth, parse_duration

KEYS = ("latency", "bandwidth", "loss")


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


def parse_link(spec: str) -> Link:
    """`latency=50ms,bandwidth=100mbit,loss=0`; empty means an unshaped link."""
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, text = item.partition("=")
        if key not in KEYS or not text:
            raise ValueError(
                f"fleet.link = {spec!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(KEYS)}"
            )
        if key == "latency":
            values["latency_s"] = parse_duration(text)
        elif key == "bandwidth":
            values["bits_per_s"] = parse_bandwidth(text)
        else:
            values["loss"] = float(text)
            if not 0 <= values["loss"] < 1:
                raise ValueError(f"fleet.link = {spec!r}: loss must be in [0, 1)")
    return Link(**values)
