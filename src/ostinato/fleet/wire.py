"""The fleet's control plane on torch.distributed's TCPStore: connection, auth, JSON keys.

The coordinator hosts the store. Islands knock on a public key with an HMAC of their name under
the fleet's token; every other key lives under a prefix derived from the token, so a client
without it can neither read nor write the fleet's state. Values are JSON, never pickles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

KNOCK = "knock"


class Unreachable(ValueError):
    """The coordinator did not answer: a wrong address, or it is not running."""  # public: append-only log of join requests


def fleet_token(configured: str) -> str:
    return configured or os.environ.get("OSTINATO_FLEET_TOKEN", "")


def namespace(token: str) -> str:
    return "fleet-" + hashlib.sha256(("ostinato:" + token).encode()).hexdigest()[:16]


def knock_mac(token: str, island: str, nonce: str) -> str:
    return hmac.new(token.encode(), f"{island}:{nonce}".encode(), hashlib.sha256).hexdigest()


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"fleet address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:29400")
    return host or "127.0.0.1", int(port)


def serve_store(address: str) -> dist.TCPStore:
    """The coordinator's store; port 0 picks a free one (read it back from `.port`)."""
    host, port = split_address(address)
    return dist.TCPStore(
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
        use_libuv=True,
    )


def connect(address: str, wait_s: float) -> dist.TCPStore:
    """A client connection, retried until `wait_s`; then a clear error."""
    host, port = split_address(address)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=min(10.0, wait_s))
            )
        except (RuntimeError, dist.DistStoreError) as exc:
            if time.monotonic() >= deadline:
                raise Unreachable(
                    f"fleet coordinator at {address} is not reachable after {wait_s:.0f} s ({exc}). "
                    f"Start it with `ostinato fleet coordinator --bind {address}` or check "
                    f"--fleet.coordinator."
                ) from None
            time.sleep(0.2)


class Keys:
    """JSON get/set on a prefixed view of the store."""

    def __init__(self, store: dist.Store, prefix: str):
        self.store = store
        self.view = dist.PrefixStore(prefix, store)

    def put(self, key: str, value: Any) -> None:
        self.view.set(key, json.dumps(value))

    def has(self, key: str) -> bool:
        return self.view.check([key])

    def get(self, key: str, default: Any = None) -> Any:
        if not self.view.check([key]):
            return default
        return json.loads(self.view.get(key))
