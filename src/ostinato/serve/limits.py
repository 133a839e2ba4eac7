"""Bounds on what one request may make the server hold: its body's size, before any parsing."""

from __future__ import annotations

from typing import Any

from ostinato.serve.schemas import error_response

Scope = dict[str, Any]


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it.

    A declared Content-Length over the limit is refused before a byte of the body is read; a
    chunked body is counted as it arrives and refused as soon as it passes the limit, so the
    server never holds more than `limit` bytes of one request. A body within the limit is
    handed on whole. After a 413, uvicorn reads and discards the rest of the body (without
    keeping it), so the client, still sending, gets to read the answer.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left: nobody to answer
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope: Scope, receive, send) -> None:
        response = error_response(
            413,
            f"the request body is larger than this server accepts ({self.limit} bytes; "
            "--max-body-bytes)",
            code="request_too_large",
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _replay(body: bytes, receive):
    """`receive` as if the body had not been read yet; then the connection's own (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed
