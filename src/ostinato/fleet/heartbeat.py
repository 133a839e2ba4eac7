"""An island's heartbeats to the coordinator, on a connection and a thread of their own, so a
link saturated by pseudo-gradients does not make a healthy island look dead.

A heartbeat carries the island's status, its inner step among it: the coordinator's progress
guard (fleet/membership.py) counts an island that beats but whose step stays put as stalled. The
same thread keeps the island's liveness connection open (fleet/liveness.py): if the process dies,
the coordinator reads its end at once, without waiting for the beats to stop."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch.distributed as dist

from ostinato.config import FleetConfig
from ostinato.fleet import wire
from ostinato.fleet.liveness import LivenessLink


class Heartbeat(threading.Thread):
    """Tells the coordinator this island is alive, on a connection of its own."""

    def __init__(self, cfg: FleetConfig, island: str, token: str):
        super().__init__(daemon=True, name="ostinato-heartbeat")
        self.cfg, self.island, self.prefix = cfg, island, wire.namespace(token)
        self.status: dict[str, Any] = {"state": "starting"}
        self.nonce = ""  # of the island's current admission: its liveness connection's name
        self.link = LivenessLink(cfg.coordinator, token, island)
        self._stopping = threading.Event()

    def run(self) -> None:
        beat, keys = 0, None
        while True:
            try:
                keys = keys or wire.Keys(wire.connect(self.cfg.coordinator, 5.0), self.prefix)
                keys.put(f"hb/{self.island}", {**self.status, "n": beat, "time": time.time()})
                beat += 1
                self._keep_link(keys)
            except (RuntimeError, ValueError, dist.DistStoreError):
                keys = None  # the coordinator restarts: reconnect on the next beat
            if self._stopping.is_set():
                self.link.leave()  # after one last beat, so the coordinator sees it leave
                return
            self._stopping.wait(self.cfg.heartbeat_s)

    def _keep_link(self, keys: wire.Keys) -> None:
        try:
            self.link.keep(keys, self.nonce)
        except OSError:  # the coordinator restarts: try again on the next beat
            self.link.close()

    def progress(self, step: int, **status: Any) -> None:
        """An inner step completed (with what else the status should say, e.g. tokens_per_s):
        the island trains, and is at `step`."""
        self.status.update(status, step=step, state="training")

    def news(self) -> None:
        """The island wrote what the coordinator waits on in a round: tell it now."""
        self.link.news()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5.0)
