"""From the engine thread to a client's stream: tokens carried to the event loop in batches,
and turned into text pieces with the finish reason that ends them."""

from __future__ import annotations

import asyncio
import threading

from ostinato.serve.text import TextStream


def text_of(
    arrived: list[tuple[int | None, str | None]], text: TextStream
) -> tuple[str, str | None]:
    """The text of tokens in arrival order, and the finish reason if one of them ended it."""
    tokens = [token for token, _ in arrived if token is not None]
    reason = next((reason for _, reason in arrived if reason is not None), None)
    piece = text.push_many(tokens)
    if text.stopped:
        return piece, "stop"
    if reason is not None:
        return piece + text.flush(), reason
    return piece, None


class Mailbox:
    """Carries tokens from the engine thread to the event loop's queues, one wake-up of the loop
    per batch of tokens instead of one per token: each wake-up is a write to the loop's
    self-pipe and a hand-over of the GIL, and an engine step emits a token for every sequence.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple[int | None, str | None]]] = []

    def __call__(self, queue: asyncio.Queue):
        """The engine's `emit` for the sequence whose tokens go to `queue`."""

        def emit(token: int | None, reason: str | None) -> None:  # runs on the engine thread
            with self.lock:
                self.pending.append((queue, (token, reason)))
                first = len(self.pending) == 1
            if first:  # a later token finds the wake-up already asked for
                self.loop.call_soon_threadsafe(self._deliver)

        return emit

    def _deliver(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for queue, item in batch:
            queue.put_nowait(item)
