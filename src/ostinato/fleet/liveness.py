"""A dead island is known from its transport, at once: each island holds one TCP connection open
to the coordinator, and a process that dies (crash, SIGKILL, OOM) has its sockets closed by the
kernel, so the coordinator reads end-of-file within a tick instead of waiting out a heartbeat
timeout. What does not close a socket (a hang, a stall, a cut cable) is still caught by the
heartbeat and progress guards.

The coordinator listens on its own address (port 0: the OS picks; published under the fleet's
key prefix as `liveness`). On accept it sends a fresh challenge line; the island answers with one
JSON line {"island", "nonce", "mac"}, the MAC under the fleet token over the challenge, so a
stranger cannot attach a connection for an island and close it to have that island dropped, and
a recorded hello is worth nothing on another connection. An island that leaves on purpose says
"bye" first: its end-of-file is then a departure, not a death.

The same connection carries news: one byte when the island has written what the coordinator waits
on in a round (ready, a result). The coordinator sleeps on these sockets between its slow ticks
instead of polling the store, so it costs no core while the islands train, and answers at once.
"""

from __future__ import annotations

import hmac
import json
import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from ostinato.fleet import wire

KEY = "liveness"  # under the fleet's prefix: {"port": P}
MAX_HELLO_BYTES = 1024  # a hello is ~150 bytes; more is junk
HELLO_WAIT_S = 10.0  # a connection that says nothing for this long is dropped
MAX_PENDING = 256  # connections not yet attached; the oldest is dropped beyond that
BYE = b"bye\n"
NEWS = b"n"  # the island wrote what the coordinator waits on: look at the round now


def hello_mac(token: str, island: str, nonce: str, challenge: str) -> str:
    return wire.mac(token, "live", island, nonce, challenge).hex()


@dataclass
class _Pending:
    challenge: str
    since: float
    buffer: bytes = b""


@dataclass
class _Attached:
    island: str
    nonce: str
    leaving: bool = False


class LivenessServer:
    """The coordinator's side: accepts and checks hellos; `poll()` returns the connections that
    ended since the last call, as (island, nonce, died) with died False for a "bye"; `news` says
    whether an attached island sent news since `take_news()` last cleared it."""

    def __init__(self, host: str, token: str):
        self.token = token
        self.listener = wire.listening_socket(host, 0)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.pending: dict[socket.socket, _Pending] = {}
        self.attached: dict[socket.socket, _Attached] = {}
        self.current: dict[tuple[str, str], socket.socket] = {}  # (island, nonce) -> connection
        self.news = False

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def poll(self) -> list[tuple[str, str, bool]]:
        ended: list[tuple[str, str, bool]] = []
        for key, _ in self.selector.select(timeout=0):
            if key.fileobj is self.listener:
                self._accept()
            else:
                ended += self._read(key.fileobj)
        self._drop_silent()
        return ended

    def wait(self, timeout: float) -> None:
        """Until a connection has something to say (a hello, news, its end) or `timeout`."""
        self.selector.select(timeout=timeout)

    def take_news(self) -> bool:
        news, self.news = self.news, False
        return news

    def connected(self, island: str, nonce: str) -> bool:
        return (island, nonce) in self.current

    def close(self) -> None:
        for conn in [*self.pending, *self.attached]:
            self._forget(conn)
        self.selector.close()
        self.listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return
        while len(self.pending) >= MAX_PENDING:
            self._forget(next(iter(self.pending)))
        conn.setblocking(False)
        challenge = secrets.token_hex(16)
        try:
            conn.send((challenge + "\n").encode())  # 33 bytes into an empty buffer: never short
        except OSError:
            conn.close()
            return
        self.pending[conn] = _Pending(challenge, time.monotonic())
        self.selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> list[tuple[str, str, bool]]:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:  # reset by the peer: as good as end-of-file
            data = b""
        if conn in self.pending:
            self._hello(conn, data)
            return []
        attached = self.attached[conn]
        if data:
            attached.leaving = attached.leaving or BYE in data
            self.news = self.news or NEWS in data
            return []
        self._forget(conn)
        return [(attached.island, attached.nonce, not attached.leaving)]

    def _hello(self, conn: socket.socket, data: bytes) -> None:
        pending = self.pending[conn]
        pending.buffer += data
        if not data or len(pending.buffer) > MAX_HELLO_BYTES:
            self._forget(conn)
            return
        line, newline, _ = pending.buffer.partition(b"\n")
        if not newline:
            return
        try:
            hello = json.loads(line)
            island, nonce, given = str(hello["island"]), str(hello["nonce"]), str(hello["mac"])
        except (ValueError, KeyError, TypeError):
            self._forget(conn)
            return
        expected = hello_mac(self.token, island, nonce, pending.challenge)
        if not hmac.compare_digest(given.encode(), expected.encode()):
            self._forget(conn)
            return
        del self.pending[conn]
        previous = self.current.get((island, nonce))
        if previous is not None:  # the island reconnected: its old connection says nothing
            self._forget(previous)
        self.attached[conn] = _Attached(island, nonce)
        self.current[(island, nonce)] = conn

    def _drop_silent(self) -> None:
        now = time.monotonic()
        for conn, pending in list(self.pending.items()):
            if now - pending.since > HELLO_WAIT_S:
                self._forget(conn)

    def _forget(self, conn: socket.socket) -> None:
        self.pending.pop(conn, None)
        attached = self.attached.pop(conn, None)
        if attached and self.current.get((attached.island, attached.nonce)) is conn:
            del self.current[(attached.island, attached.nonce)]
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


class LivenessLink:
    """The island's side: one connection, attached under the island's current nonce, and
    re-made when the nonce changes (a new knock) or the coordinator went away (a restart). The
    heartbeat thread keeps it; the trainer's thread sends news on it."""

    def __init__(self, coordinator: str, token: str, island: str):
        self.coordinator = coordinator
        self.token, self.island = token, island
        self.sock: socket.socket | None = None
        self.nonce = ""
        self.lock = threading.RLock()

    def keep(self, keys: wire.Keys, nonce: str) -> None:
        """Make sure a connection under `nonce` is open (cheap when it is)."""
        with self.lock:
            if self.sock is not None and self.nonce == nonce and not self._ended():
                return
            self.close()
            published = keys.get(KEY)
            if published is None or not nonce:
                return  # a coordinator without a liveness port: heartbeats alone
            host = wire.split_address(self.coordinator)[0]
            sock = socket.create_connection((host, int(published["port"])), timeout=2.0)
            try:
                challenge = _read_line(sock).decode()
                mac = hello_mac(self.token, self.island, nonce, challenge)
                hello = {"island": self.island, "nonce": nonce, "mac": mac}
                sock.sendall((json.dumps(hello) + "\n").encode())
            except (OSError, UnicodeDecodeError):
                sock.close()
                raise
            self.sock, self.nonce = sock, nonce

    def news(self) -> None:
        """One byte: look at the round now. Never waits: while the heartbeat thread re-makes the
        connection, or when there is none, the news is dropped and the coordinator's next slow
        tick (a tenth of a second) reads the store anyway."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.sock is not None:
                self.sock.sendall(NEWS)
        except OSError:
            pass  # the heartbeat thread finds the connection ended and re-makes it
        finally:
            self.lock.release()

    def leave(self) -> None:
        """Say this island leaves on purpose, then close."""
        with self.lock:
            if self.sock is not None:
                try:
                    self.sock.sendall(BYE)
                except OSError:
                    pass
            self.close()

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()
            self.sock = None

    def _ended(self) -> bool:
        """Whether the coordinator closed the connection (it restarted, or dropped us)."""
        try:
            self.sock.setblocking(False)
            try:
                return self.sock.recv(64) == b""
            finally:
                self.sock.setblocking(True)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk or len(line) > 128:
            raise ConnectionError("the coordinator sent no challenge")
        line += chunk
    return line.strip()
