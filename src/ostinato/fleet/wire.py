"""The fleet's control plane on torch.distributed's TCPStore: connection, auth, JSON keys.

The coordinator hosts the store, listening only on the address it is given. Islands knock on a
public key and join by challenge-response under the fleet's token (fleet/membership.py); every
other key lives under a prefix derived from the token. Payloads between islands (pseudo-gradients,
heals) carry an HMAC under the token bound to their round, attempt and sender. Values are JSON or
raw tensor bytes, never pickles. Nothing is encrypted: across sites, use a private network or a
tunnel.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ostinato import errors
from ostinato.fleet.compress import MAC_BYTES

KNOCK = "knock"  # public: the log of join messages, compacted by the coordinator


class Unreachable(errors.Unreachable):  # transient: its own exit code (ostinato.errors)
    """The coordinator did not answer: a wrong address, or it is not running."""


def fleet_token(configured: str) -> str:
    return configured or os.environ.get("OSTINATO_FLEET_TOKEN", "")


def namespace(token: str) -> str:
    return "fleet-" + hashlib.sha256(("ostinato:" + token).encode()).hexdigest()[:16]


def mac(token: str, label: str, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 under the token over a label and parts, each length-prefixed so that no two
    different sequences of parts hash the same bytes."""
    digest = hmac.new(token.encode(), label.encode(), hashlib.sha256)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()


def join_mac(token: str, answer: dict[str, Any]) -> str:
    """The MAC of a join answer: every field but the MAC itself, the coordinator's challenge
    among them, so a recorded answer is worth nothing once its challenge is spent."""
    body = json.dumps({k: v for k, v in answer.items() if k != "mac"}, sort_keys=True)
    return mac(token, "join", body).hex()


def seal(payload: torch.Tensor, token: str, *context: bytes | str | int) -> torch.Tensor:
    """`payload` (uint8) followed by its MAC over the bytes and `context` (what it is, round,
    attempt, sender...), so it cannot be changed, nor replayed into another round."""
    tag = mac(token, "payload", *context, payload.numpy().tobytes())
    return torch.cat([payload, torch.frombuffer(bytearray(tag), dtype=torch.uint8)])


def unseal(sealed: torch.Tensor, token: str, *context: bytes | str | int) -> torch.Tensor | None:
    """The payload of `sealed` if its MAC holds for `context`; None if it was changed."""
    if sealed.numel() < MAC_BYTES:
        return None
    payload, tag = sealed[:-MAC_BYTES], sealed[-MAC_BYTES:]
    expected = mac(token, "payload", *context, payload.numpy().tobytes())
    return payload if hmac.compare_digest(expected, tag.numpy().tobytes()) else None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"fleet address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:29400")
    return host.strip("[]") or "127.0.0.1", int(port)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host` alone (port 0: a free one) and listening."""
    family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve_store(address: str) -> dist.TCPStore:
    """The coordinator's store, listening on the given address only; port 0 picks a free one
    (read it back from `.port`).

    TCPStore's server binds every interface whatever host it is given, so the socket is bound
    here and handed over, already listening, as `master_listen_fd` (libuv takes it as is)."""
    host, port = split_address(address)
    sock = listening_socket(host, port)
    try:
        store = dist.TCPStore(
            host,
            sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=30),
            master_listen_fd=sock.fileno(),
            use_libuv=True,
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now and closes it with itself
    return store


def local_address(address: str) -> str:
    """This machine's address on the route to `address`: where its exchange groups listen, so
    peers reach them the way they reach the coordinator and nothing else listens."""
    host, port = split_address(address)
    family, _, _, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(where)  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


def gloo_device(coordinator: str) -> dist.ProcessGroupGloo.Device:
    """A gloo device listening on this machine's address towards the coordinator, and on no
    other: by default gloo binds whatever the host name resolves to."""
    return dist.ProcessGroupGloo.create_device(hostname=local_address(coordinator))


def gloo_group(
    store: dist.Store, rank: int, size: int, timeout_s: float, device
) -> dist.ProcessGroupGloo:
    options = dist.ProcessGroupGloo._Options()
    options._devices = [device]
    options._timeout = timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(store, rank, size, options)


def group_keys(name: str, size: int) -> list[str]:
    """The keys gloo's rendezvous writes for a group of `size` on one device, under the group's
    store prefix: "<device>/<rank>" (pinned by a test, since gloo does not document them)."""
    return [f"{name}/0/{rank}" for rank in range(size)]


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


# Bumped by the coordinator after a tick in which it wrote or deleted keys (and by a donor after
# its heal order): a waiting member reads this one counter (one round trip) instead of every key
# it waits on (two each: check, then get). On a box the islands share, those polls took the
# cores that the training steps needed. (The coordinator learns members' news from their
# liveness connections: fleet/liveness.py.)
ORDERS = "orders"


class Keys:
    """JSON get/set on a prefixed view of the store."""

    def __init__(self, store: dist.Store, prefix: str):
        self.store = store
        self.view = dist.PrefixStore(prefix, store)
        self.writes = 0  # puts and deletes through this view, so a writer knows to bump ORDERS

    def put(self, key: str, value: Any, announce: bool = True) -> None:
        """announce=False: not counted for ORDERS (a key rewritten often that nobody waits on)."""
        self.view.set(key, json.dumps(value))
        self.writes += announce

    def counter(self, key: str) -> int:
        return self.view.add(key, 0)

    def bump(self, key: str) -> None:
        self.view.add(key, 1)

    def has(self, key: str) -> bool:
        return self.view.check([key])

    def get(self, key: str, default: Any = None) -> Any:
        if not self.view.check([key]):
            return default
        return json.loads(self.view.get(key))

    def delete(self, *keys: str) -> None:
        for key in keys:
            self.view.delete_key(key)
        self.writes += len(keys)


class Watch:
    """Whether a counter (ORDERS) moved since the last look: a poller reads the keys it
    waits on only then. It looks anyway every `every_s`, so a counter that a restarted
    coordinator began again (and could bring back to the same count) delays nothing for long.
    The first call always says yes: what was written before the wait began is read at once."""

    def __init__(self, keys: Keys, key: str, every_s: float = 1.0):
        self.keys, self.key, self.every_s = keys, key, every_s
        self.seen: int | None = None
        self.looked_at = float("-inf")

    def moved(self) -> bool:
        now = time.monotonic()
        count = self.keys.counter(self.key)  # read before the keys, so no change slips between
        if count == self.seen and now - self.looked_at < self.every_s:
            return False
        self.seen, self.looked_at = count, now
        return True
