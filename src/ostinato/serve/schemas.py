"""Request bodies of the OpenAI-compatible API, and its error body.

Fields OpenAI defines that we do not implement (logprobs, tools, ...) are ignored, as extra
fields; the ones that would change the answer (n > 1) are refused by validation. Every list
has a cap and every string must be valid Unicode, so what a request can cost is bounded
before any of it reaches the tokenizer or the engine (the body's size is bounded before this).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, StrictInt

MAX_MESSAGES = 4096  # chat messages (and content parts of one message) in one request
MAX_PROMPT_IDS = 1 << 17  # token ids in a pre-tokenized prompt: beyond any model's context here
MAX_STOP = 16  # stop strings (OpenAI allows 4, vLLM any number)
# torch.Generator.manual_seed takes [-2**63, 2**64): OpenAI's int64 seeds and unsigned ones.
SEED_RANGE = {"ge": -(1 << 63), "lt": 1 << 64}


def _valid_unicode(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    error_type = kind.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, not_found_error, ...
    param: str | None = None  # the request field at fault, e.g. "messages.0.content"
    code: str | None = None


class ErrorBody(BaseModel):
    """What every refusal (4xx) and failure (5xx) answers, as OpenAI's API does."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(BaseModel):
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default: sampled
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(GenerationFields):
    # Token ids are JSON integers: strict, so true/false or 1.0 are refused rather than read.
    prompt: Text | Annotated[list[StrictInt], Field(max_length=MAX_PROMPT_IDS)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


# What the OpenAPI description publishes for each route: the statuses the server really answers
# (validation failures are 400, not FastAPI's 422: "default" stands for the rest, e.g. 405, 500).
# Errors are JSON even where the route's own answer is not (/metrics is text/plain), so they
# refer to ErrorBody directly: a "model" would be published under the route's media type.
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
PLAIN_RESPONSES = {
    401: {
        "description": "The server requires an API key (--api-key): none or a wrong one given.",
        "content": _ERROR_JSON,
    },
    "default": {
        "description": "Any other failure: 405 (wrong method; its Allow header names the right "
        "ones), 500 (internal error).",
        "content": _ERROR_JSON,
    },
}
GENERATION_RESPONSES = {
    200: {
        "description": "The completion; with stream: true, server-sent events ending in [DONE].",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    400: {
        "model": ErrorBody,  # publishes ErrorBody among the schemas, for every route to refer to
        "description": "A field is invalid (param names it), or prompt and max_tokens exceed "
        "the model's context (code context_length_exceeded).",
    },
    404: {"model": ErrorBody, "description": "The model asked for is not the one served."},
    413: {"model": ErrorBody, "description": "The request body is over --max-body-bytes."},
    429: {"model": ErrorBody, "description": "Too many requests in flight (--max-concurrent)."},
    **PLAIN_RESPONSES,
}
