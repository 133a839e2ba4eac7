"""The OpenAI-compatible HTTP API over the engine: completions, chat, streaming, metrics.

Every refusal is an OpenAI-style error body with a 4xx status; an unexpected failure is a 500
with a one-line message (the traceback goes to the server log, never to the client). One request
never holds up another: bodies are bounded before parsing, tokenizing runs off the event loop,
and a sequence that fails in the engine ends alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from ostinato.config import ServeConfig
from ostinato.serve.engine import Engine, Sampling
from ostinato.serve.limits import BodyLimit
from ostinato.serve.schemas import (
    GENERATION_RESPONSES,
    PLAIN_RESPONSES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerationFields,
    error_response,
)
from ostinato.serve.stream import Mailbox, text_of
from ostinato.serve.text import CHAT_TEMPLATE, TextStream, render_chat

log = logging.getLogger("ostinato")
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
# Pydantic's location parts that name a member of a union, not a field of the request.
UNION_TAGS = {"str", "int", "float", "bool", "none"}


@dataclass
class Served:
    """What the API serves: the engine, its tokenizer and how requests may use them."""

    engine: Engine
    tokenizer: Tokenizer
    name: str
    eos_token: str
    chat_template: str = CHAT_TEMPLATE
    api_key: str | None = None
    max_concurrent: int = 64
    max_body_bytes: int = ServeConfig.max_body_bytes
    http: Counter = field(default_factory=Counter)  # (path, status) -> requests
    mailbox: Mailbox | None = None  # set when the app starts, on its event loop
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(served: Served) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served.mailbox = Mailbox(asyncio.get_running_loop())
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="ostinato", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    _add_middleware(app, served)
    _add_routes(app, served)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        # Of a union's failed members, the one that got deepest is the one the client meant
        # (a list of stop strings, not a string): its location names the field.
        param = _field_path(max(problems, key=lambda p: len(p.get("loc", ()))).get("loc", ()))
        message = "; ".join(
            f"{_field_path(p.get('loc', ())) or 'body'}: {p.get('msg')}" for p in problems
        )
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Keeps the exception's headers: a 405 must say which methods are allowed (Allow).
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")


def _field_path(loc: tuple) -> str | None:
    """'messages.0.content' from pydantic's error location: no 'body', no union-member tags."""
    parts = [
        str(part)
        for part in loc[1:]
        if isinstance(part, int) or (part.isidentifier() and part not in UNION_TAGS)
    ]
    return ".".join(parts) or None


def _add_middleware(app: FastAPI, served: Served) -> None:
    # Added first, so it runs inside the one below: its 413s are counted in the metrics.
    app.add_middleware(BodyLimit, limit=served.max_body_bytes)
    app.add_middleware(AuthAndCount, served=served)


class AuthAndCount:
    """ASGI middleware: refuses a missing or wrong API key, and counts responses by path and
    status. Plain ASGI, not FastAPI's `@app.middleware("http")`: that one runs every streamed
    chunk through a memory stream and a task group of its own, per-token work on the event
    loop that every stream shares."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Unknown paths share one label, so scanners cannot grow the metrics without bound.
        path = scope["path"] if scope["path"] in ROUTES else "other"
        key = self.served.api_key
        if key is not None and not _authorized(scope, key):
            self.served.http[(path, 401)] += 1
            refusal = error_response(401, "missing or wrong API key", code="invalid_api_key")
            await refusal(scope, receive, send)
            return

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.served.http[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counted)


def _authorized(scope, key: str) -> bool:
    given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
    return hmac.compare_digest(given, f"Bearer {key}".encode())


def _add_routes(app: FastAPI, served: Served) -> None:
    @app.get("/health", responses=PLAIN_RESPONSES)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, responses=PLAIN_RESPONSES)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(served), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=PLAIN_RESPONSES)
    async def models() -> dict[str, Any]:
        card = {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "ostinato",
            "max_model_len": served.engine.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = await asyncio.to_thread(_encode, served, prompt)
        return await _respond(served, body, prompt, body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat(body: ChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await asyncio.to_thread(_encode_chat, served, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _respond(served, body, prompt, max_tokens, chat=True)


# Rendering and tokenizing run in worker threads: a long prompt costs its own request time,
# never the event loop's, so /health and the streams of other requests go on meanwhile.
# `encode_batch_fast` (tokenizers >= 0.20, which transformers requires), because `encode`
# holds the GIL throughout (seconds for a 1 MiB prompt), which would stop the event loop as
# surely as running it there; the fast variant skips the character offsets we never use.
def _encode(served: Served, text: str) -> list[int]:
    return served.tokenizer.encode_batch_fast([text], add_special_tokens=False)[0].ids


def _encode_chat(served: Served, messages: list[dict[str, str]]) -> list[int]:
    return _encode(served, render_chat(messages, served.eos_token, served.chat_template))


def _check(served: Served, body: GenerationFields, prompt: list[int], max_tokens: int) -> None:
    """Refuse what the engine cannot do, with the status and wording OpenAI clients expect."""
    if body.model != served.name:
        raise ApiError(
            404,
            f"model {body.model!r} does not exist; this server has {served.name!r}",
            param="model",
            code="model_not_found",
        )
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    context = served.engine.max_seq_len
    if len(prompt) + max_tokens > context:
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens; the prompt has "
            f"{len(prompt)} and max_tokens asks for {max_tokens} more",
            param="max_tokens" if len(prompt) < context else "prompt",
            code="context_length_exceeded",
        )
    vocab = served.tokenizer.get_vocab_size()  # checked after the length: at most `context` ids
    if any(not 0 <= t < vocab for t in prompt):
        raise ApiError(400, f"token ids must lie in [0, {vocab})", param="prompt")
    if served.engine.load() >= served.max_concurrent:
        raise ApiError(
            429,
            f"too many concurrent requests (limit {served.max_concurrent}); retry shortly",
            code="too_many_requests",
        )


async def _respond(
    served: Served, body: GenerationFields, prompt: list[int], max_tokens: int | None, chat: bool
):
    # Without max_tokens a chat answer may use the rest of the context, as OpenAI's does.
    max_tokens = max_tokens or max(1, served.engine.max_seq_len - len(prompt))
    _check(served, body, prompt, max_tokens)
    sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed, body.ignore_eos)
    stream = TextStream(served.tokenizer, body.stop_list(), lstrip=chat)
    pieces = _generate(served, prompt, sampling, stream)
    reply = Reply(served.name, chat, len(prompt), stream)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(reply.events(pieces, usage), media_type="text/event-stream")
    text, reason = "", None
    async for piece, finish in pieces:
        text, reason = text + piece, finish
    if reason == "error":
        raise ApiError(500, "generation failed in the engine; see the server log")
    return reply.full(text, reason)


async def _generate(
    served: Served, prompt: list[int], sampling: Sampling, text: TextStream
) -> AsyncIterator[tuple[str, str | None]]:
    """(text piece, finish reason or None) as the engine produces tokens.

    Tokens that arrived while the client's last chunk was being sent go out as one chunk: a
    busy server sends fewer, larger chunks instead of falling behind the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()
    seq = served.engine.submit(prompt, sampling, served.mailbox(queue))
    try:
        while True:
            arrived = [await queue.get()]
            while not queue.empty():
                arrived.append(queue.get_nowait())
            piece, reason = text_of(arrived, text)
            if reason is not None:
                yield piece, reason
                return
            if piece:
                yield piece, None
    finally:  # finished, stopped by a stop string, or the client went away
        served.engine.cancel(seq)


@dataclass
class Reply:
    """Shapes text into OpenAI's completion / chat.completion objects and their chunks."""

    model: str
    chat: bool
    prompt_tokens: int
    stream: TextStream  # its token ids are the completion's
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def full(self, text: str, reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update(
            {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        )
        return {**self._head(chunk=False), "choices": [choice], "usage": self._usage()}

    async def events(self, pieces: AsyncIterator[tuple[str, str | None]], usage: bool):
        if self.chat:
            yield self._chunk({"role": "assistant", "content": ""}, None)
        async for piece, reason in pieces:
            if reason == "error":
                error = {"message": "generation failed in the engine", "type": "server_error"}
                yield _sse({"error": error})
                break
            yield self._chunk({"content": piece} if self.chat else piece, reason)
        if usage:
            yield _sse({**self._head(chunk=True), "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"

    def _chunk(self, content: Any, reason: str | None) -> str:
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"delta": content} if self.chat else {"text": content})
        return _sse({**self._head(chunk=True), "choices": [choice]})

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if self.chat
            else "text_completion"
        )
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {
            "id": prefix + self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
        }

    def _usage(self) -> dict[str, int]:
        done = len(self.stream.ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def prometheus_text(served: Served) -> str:
    """Counters and gauges in Prometheus' text exposition format."""
    stats, engine = served.engine.stats, served.engine
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP ostinato_{name} {help_text}", f"# TYPE ostinato_{name} {kind}"])
        lines.extend(f"ostinato_{name}{labels} {value}" for labels, value in samples)

    metric(
        "prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats["prompt_tokens"])]
    )
    metric(
        "generated_tokens_total", "counter", "Tokens generated.", [("", stats["generated_tokens"])]
    )
    metric(
        "decode_steps_total", "counter", "Batched decoding steps.", [("", stats["decode_steps"])]
    )
    metric(
        "decode_rows_total",
        "counter",
        "Sequences advanced, summed over decoding steps.",
        [("", stats["decode_rows"])],
    )
    reasons = [(f'{{reason="{r}"}}', stats[f"finished_{r}"]) for r in ("stop", "length", "error")]
    metric("sequences_finished_total", "counter", "Sequences finished, by reason.", reasons)
    with engine.cond:
        running, waiting = len(engine.running), len(engine.waiting)
    metric("sequences_running", "gauge", "Sequences holding a KV-cache slot.", [("", running)])
    metric("sequences_waiting", "gauge", "Sequences waiting for a slot.", [("", waiting)])
    http = [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(served.http.items())]
    metric("http_requests_total", "counter", "HTTP requests, by path and status.", http)
    return "\n".join(lines) + "\n"
