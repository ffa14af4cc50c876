"""The OpenAI-compatible HTTP app: ``/v1/completions``, ``/v1/models``, ``/health`` and the playground.

Requests are checked here (size, JSON, types, ranges, limits, model, prompt characters) and every
refusal is an HTTP error whose JSON names the field, in OpenAI's error shape. Accepted requests
become streams of the model's ``Batcher``. Nothing in a request reaches the filesystem: models are
looked up by name in a dict and the playground's three files are read once, at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Literal, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from ..sampling import Sampler
from .batcher import Batcher, Busy, Event, Settings, Slots, Stream

NEUTRAL = {"best_of": 1, "suffix": None, "frequency_penalty": 0.0,
           "presence_penalty": 0.0, "logit_bias": None}  # accepted OpenAI fields, only at these values


@dataclass
class Limits:
    """What one request may ask for, and how many streams may run at once (all configurable)."""

    max_tokens: int = 2000  # tokens per completion
    max_prompt_chars: int = 8000  # characters per prompt
    max_body_bytes: int = 65536  # request body size
    max_n: int = 16  # completions per prompt
    max_streams: int = 64  # streams sampling at once, all models and requests together; past it: 429
    max_logprobs: int = 5  # most likely tokens per position a request may ask for (``logprobs``)


class CompletionRequest(BaseModel):
    """OpenAI's completion request, plus ``top_k``, ``repetition_penalty`` and ``unknown``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: Optional[str] = Field(None, description="A served model's name (optional when one is served).")
    prompt: Union[str, list[str]] = Field("", description="Text to continue, or a list of them.")
    max_tokens: int = Field(16, ge=0, description="Tokens (characters, for a char model) to generate; "
                            "0 with echo and logprobs scores the prompt.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0 = off). Extension.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="> 1 discourages repeats. Extension.")
    n: int = Field(1, ge=1, description="Completions per prompt.")
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings that end a completion.")
    seed: Optional[int] = Field(None, ge=0, lt=2**63, description="Same seed, same text (choice i uses seed + i).")
    stream: bool = Field(False, description="Server-sent events, ending with data: [DONE].")
    unknown: Literal["error", "skip"] = Field("error", description="Prompt characters outside the "
                                              "vocabulary: a 400 error, or skip them. Extension.")
    user: Optional[str] = None
    stream_options: Optional[dict] = None
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")
    logprobs: Optional[int] = Field(None, ge=0, description="Each token's log-probability and the N most "
                                    "likely tokens at its place (N up to the server's limit, 5 by default).")
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict] = None


class ApiError(Exception):
    """A refusal: HTTP status, a message naming the field, and the field (OpenAI's ``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(message: str, param: str | None, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def create_app(samplers: dict[str, Sampler], limits: Limits | None = None, api_key: str | None = None,
               chunk_seconds: float = 0.02, threads: int | None = None) -> FastAPI:
    """The app serving ``samplers`` by name; one batcher thread per model, stopped at shutdown."""
    limits = limits or Limits()
    slots = Slots(limits.max_streams)
    batchers = {name: Batcher(sampler, slots, threads) for name, sampler in samplers.items()}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.close()
        for batcher in batchers.values():
            batcher.stop()

    app = FastAPI(title="textrnn", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions from textrnn runs, with a playground at /.")
    app.state.batchers = batchers
    app.state.slots = slots
    app.state.closing = False

    def close() -> None:
        """Stop taking requests; every stream in flight ends with an error event."""
        app.state.closing = True
        for batcher in batchers.values():
            batcher.request_stop()

    app.state.close = close
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY", "authorization",
                           "authentication_error")

    @app.get("/health")
    def health() -> dict:
        return {"status": "closing" if app.state.closing else "ok", "models": list(samplers),
                "active_streams": slots.used, "max_streams": limits.max_streams, "auth": api_key is not None}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def models() -> dict:
        return {"object": "list", "data": [_model_card(name, sampler) for name, sampler in samplers.items()]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)], openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": CompletionRequest.model_json_schema()}}}})
    async def completions(request: Request) -> Response:
        """OpenAI's completions: a JSON response, or server-sent events with ``"stream": true``."""
        if app.state.closing:
            raise ApiError(503, "the server is shutting down", None, "server_error")
        return await _complete(request, samplers, batchers, slots, limits, chunk_seconds)

    _add_playground(app)
    return app


async def _complete(request: Request, samplers: dict[str, Sampler], batchers: dict[str, Batcher], slots: Slots,
                    limits: Limits, chunk_seconds: float) -> Response:
    """One completions request: checked, its prompts echoed and scored if asked, its streams submitted."""
    body = _parse(await _read_body(request, limits.max_body_bytes))
    name = _model_name(body.model, samplers)
    sampler = samplers[name]
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    encoded = [_encode(sampler, prompt, body.unknown, limits, len(prompts) > 1, i)
               for i, prompt in enumerate(prompts)]
    _check_limits(body, prompts, limits)
    count = len(prompts) * body.n
    echoes = await asyncio.to_thread(_echoes, body, sampler, prompts)
    streams: list[Stream] = []
    outbox: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    if body.max_tokens:
        try:
            slots.acquire(count)
        except Busy as exc:
            raise ApiError(429, f"too many concurrent streams: {exc}; try again later", None,
                           "rate_limit_error") from None
        streams = _streams(body, encoded, outbox, chunk_seconds)
        for stream in streams:
            batchers[name].submit(stream)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name}
    choices = [_Choice(echoes[i // body.n], body.logprobs is not None) for i in range(count)]
    prompt_tokens = sum(len(encoded[i // body.n]) for i in range(count))
    if body.stream:
        return StreamingResponse(_events(head, streams, outbox, choices), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, head, streams, outbox, prompt_tokens, choices)


def _echoes(body: CompletionRequest, sampler: Sampler, prompts: list[str]) -> list[tuple[str, list[tuple]]]:
    """Per prompt, what a choice starts with: with ``echo``, the prompt and (with ``logprobs``) its
    tokens' entries (token, logprob, top, offset), the first token's logprob None; else nothing."""
    if not body.echo:
        return [("", [])] * len(prompts)
    if body.logprobs is None:
        return [(prompt, []) for prompt in prompts]
    echoes = []
    for prompt in prompts:
        scores = sampler.score(prompt, top=body.logprobs, unknown=body.unknown)
        tops = scores.top or [{}] * len(scores.ids)
        echoes.append((prompt, list(zip(scores.tokens, scores.logprobs, tops, scores.text_offset))))
    return echoes


class _Choice:
    """One choice's text so far and its logprobs entries (token, logprob, top, offset in the choice's text)."""

    def __init__(self, echo: tuple[str, list[tuple]], logprobs: bool):
        self.echo, self.echo_entries = echo
        self.logprobs = logprobs
        self.sent_echo = False

    def start(self) -> tuple[str, list[tuple]]:
        """The echoed prompt and its entries, once (the first time a choice's text goes out)."""
        if self.sent_echo:
            return "", []
        self.sent_echo = True
        return self.echo, self.echo_entries

    def body(self, echoed: list[tuple], entries: list[tuple]) -> dict | None:
        """OpenAI's ``logprobs`` object for the prompt's ``echoed`` entries and the generated ``entries``
        (whose offsets move past the echoed prompt), or None when the request asked for none."""
        if not self.logprobs:
            return None
        shift = len(self.echo)
        entries = list(echoed) + [(token, logprob, top, offset + shift) for token, logprob, top, offset in entries]
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


def _add_error_handlers(app: FastAPI) -> None:
    """Errors in OpenAI's shape: ours (ApiError) and Starlette's own (404, 405)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.param, exc.kind), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body(str(exc.detail), None, "invalid_request_error"), status_code=exc.status_code)


def _add_playground(app: FastAPI) -> None:
    """The playground's three static files, read once."""
    files = {"/": ("index.html", "text/html"), "/playground.css": ("playground.css", "text/css"),
             "/playground.js": ("playground.js", "text/javascript")}
    for route, (name, kind) in files.items():
        body = (resources.files(__package__) / "static" / name).read_bytes()
        app.add_api_route(route, _static_route(body, f"{kind}; charset=utf-8"), methods=["GET"],
                          include_in_schema=False, name=name)


def _static_route(body: bytes, media_type: str):
    def route() -> Response:
        return _static(body, media_type)
    return route


def _streams(body: "CompletionRequest", encoded: list[list[int]], outbox: asyncio.Queue,
             chunk_seconds: float) -> list[Stream]:
    """One stream per prompt and choice (``n``), in OpenAI's order: prompt 0's choices first.
    A seed gives choice ``i`` the seed + i, so that the choices differ and each can be replayed."""
    loop = asyncio.get_running_loop()
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    streams = []
    for index in range(len(encoded) * body.n):
        seed = None if body.seed is None else (body.seed + index) % 2**63
        settings = Settings(body.max_tokens, body.temperature, body.top_k, body.top_p, body.repetition_penalty,
                            seed, stops, body.logprobs)
        streams.append(Stream(encoded[index // body.n], settings, loop, outbox, index, chunk_seconds))
    return streams


# ---------------------------------------------------------------- request checks

async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it (or its declared length) passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {int(declared):,} bytes; the limit is {limit:,}", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> CompletionRequest:
    """The request model from JSON bytes: 400 for bad JSON, 422 naming the first bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body: not valid JSON ({exc})", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(data).__name__}", "body")
    try:
        body = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"]  # (field, [union member], [list index]): name the field and the index
        field = ".".join([str(loc[0])] + [str(part) for part in loc[1:] if isinstance(part, int)]) if loc else "body"
        raise ApiError(422, f"{field}: {error['msg']}", field) from None
    for key, neutral in NEUTRAL.items():
        if getattr(body, key) not in (neutral, None):
            raise ApiError(400, f"{key}: not supported (leave it out)", key)
    if isinstance(body.prompt, list) and not body.prompt:
        raise ApiError(422, "prompt: the list is empty", "prompt")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        raise ApiError(422, "stop: at most 4 strings of 1 to 256 characters", "stop")
    if not math.isfinite(body.temperature) or not math.isfinite(body.repetition_penalty):
        raise ApiError(422, "temperature and repetition_penalty must be finite", "temperature")
    return body


def _model_name(asked: str | None, samplers: dict[str, Sampler]) -> str:
    if asked is None:
        if len(samplers) == 1:
            return next(iter(samplers))
        raise ApiError(422, f"model: required when several are served ({', '.join(samplers)})", "model")
    if asked not in samplers:
        raise ApiError(404, f"model: {asked!r} is not served; served: {', '.join(samplers)}", "model",
                       "not_found_error")
    return asked


def _check_limits(body: CompletionRequest, prompts: list[str], limits: Limits) -> None:
    if body.max_tokens > limits.max_tokens:
        raise ApiError(422, f"max_tokens: {body.max_tokens} is over this server's limit of {limits.max_tokens}",
                       "max_tokens")
    if body.logprobs is not None and body.logprobs > limits.max_logprobs:
        raise ApiError(400, f"logprobs: {body.logprobs} is over this server's limit of {limits.max_logprobs}",
                       "logprobs")
    if body.n > limits.max_n:
        raise ApiError(422, f"n: {body.n} is over this server's limit of {limits.max_n}", "n")
    if len(prompts) * body.n > limits.max_streams:
        raise ApiError(422, f"prompt: {len(prompts)} prompts x n={body.n} is over this server's limit of "
                       f"{limits.max_streams} streams", "prompt")


def _encode(sampler: Sampler, prompt: str, unknown: str, limits: Limits, several: bool, index: int) -> list[int]:
    field = f"prompt.{index}" if several else "prompt"
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(422, f"{field}: {len(prompt):,} characters is over this server's limit of "
                       f"{limits.max_prompt_chars:,}", field)
    try:
        return list(sampler.tokenizer.encode(prompt, unknown=unknown))
    except InputError as exc:
        raise ApiError(400, f"{field}: {exc}; send \"unknown\": \"skip\" to drop them", field) from None


# ---------------------------------------------------------------- responses

def _chunk(head: dict, index: int, event: Event, choice: "_Choice") -> str:
    echo, echoed = choice.start()
    body = {"text": echo + event.text, "index": index, "logprobs": choice.body(echoed, event.logprobs),
            "finish_reason": event.finish_reason}
    return f"data: {json.dumps({**head, 'choices': [body]})}\n\n"


async def _events(head: dict, streams: list[Stream], outbox: asyncio.Queue,
                  choices: list[_Choice]) -> AsyncIterator[str]:
    """The SSE body: chunks as they come (all that are waiting in one write), then ``data: [DONE]``.

    However it ends (done, the client gone, the server stopping), every stream is cancelled, so
    the batcher frees their rows at its next step. Without streams (``max_tokens`` 0) each choice
    is one chunk: its echo, if asked for.
    """
    left = len(streams)
    if not streams:
        yield "".join(_chunk(head, i, Event(finish_reason="length"), c) for i, c in enumerate(choices))
    try:
        while left:
            items = [await outbox.get()]
            while not outbox.empty():
                items.append(outbox.get_nowait())
            parts = []
            for index, event in items:
                if event.error is not None:
                    parts.append(f"data: {json.dumps(_error_body(event.error, None, 'server_error'))}\n\n")
                    left = 0
                    break
                parts.append(_chunk(head, index, event, choices[index]))
                if event.finish_reason is not None:
                    left -= 1
            yield "".join(parts)
        yield "data: [DONE]\n\n"
    finally:
        for stream in streams:
            stream.cancelled = True


async def _collect(request: Request, head: dict, streams: list[Stream], outbox: asyncio.Queue,
                   prompt_tokens: int, choices: list[_Choice]) -> Response:
    """The whole response; a client that leaves before it is ready cancels its streams."""
    texts: list[list[str]] = [[] for _ in choices]
    entries: list[list[tuple]] = [[] for _ in choices]
    reasons: list[str | None] = ["length" if not streams else None] * len(choices)
    tokens = 0

    async def gather() -> None:
        nonlocal tokens
        left = len(streams)
        while left:
            index, event = await outbox.get()
            if event.error is not None:
                raise ApiError(503, event.error, None, "server_error")
            texts[index].append(event.text)
            entries[index].extend(event.logprobs)
            if event.finish_reason is not None:
                reasons[index] = event.finish_reason
                tokens += event.tokens
                left -= 1

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(gather()), asyncio.create_task(disconnect())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
        for stream in streams:
            stream.cancelled = True
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is there to read it
    work.result()  # raises the ApiError of a stream that ended with an error
    bodies = [{"text": c.echo + "".join(t), "index": i, "logprobs": c.body(c.echo_entries, entries[i]),
               "finish_reason": reasons[i]} for i, (c, t) in enumerate(zip(choices, texts))]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
    return JSONResponse({**head, "choices": bodies, "usage": usage})


def _model_card(name: str, sampler: Sampler) -> dict:
    model = sampler.config.get("model", {})
    return {"id": name, "object": "model", "created": 0, "owned_by": "textrnn",
            "cell": model.get("cell"), "num_layers": model.get("num_layers"),
            "hidden_size": model.get("hidden_size"), "tokenizer": sampler.tokenizer.kind,
            "vocab_size": sampler.tokenizer.vocab_size}


def _static(content: bytes, media_type: str) -> Response:
    return Response(content, media_type=media_type, headers={
        "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'",
        "X-Content-Type-Options": "nosniff"})


def _version() -> str:
    from .. import __version__

    return __version__
