"""An OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both also as server-sent events
with `"stream": true`, ending in `data: [DONE]`), GET /v1/models, GET /metrics (Prometheus),
GET /health (no API key needed: 200 while the engine runs, 503 once it has gone).

Requests are validated strictly (pydantic strict mode: no "5" for 5, no 0 for false); every
rejection is a 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}:
400 for bad JSON (also nested too deep, or an integer literal too long), non-UTF-8 bodies, wrong
types or ranges, a known OpenAI parameter this server does not implement (penalties, tools,
...: named in the message), and prompts that do not fit the context (code
"context_length_exceeded"; prompts are never truncated silently); 401 without the API key; 404
for another model name; 413 for bodies over `max_body_bytes`; 429 (with Retry-After) when the
engine's queue is full; 503 when the engine has gone or the server is shutting down. Unknown
fields are ignored. `n` > 1 runs n requests in the engine (a given seed is offset per choice);
`echo` (completions) puts the prompt before the text.

Logprobs: completions' `logprobs: k` (0..5) gives `choices[i].logprobs` = {tokens, token_logprobs,
top_logprobs (the k most likely tokens and the chosen one), text_offset}; chat's `logprobs: true`
with `top_logprobs: k` (0..20) gives {content: [{token, logprob, bytes, top_logprobs}]}; a stream
carries each chunk's tokens' logprobs. They are the model's own log-probabilities (log_softmax of
the raw logits, before temperature and top_p: vLLM's default) of every token counted in
completion_tokens (a stop id included; none after a stop string's last token). A token's text is
its own bytes, decoded alone (see `_Logprobs`; chat's `bytes` are exact). `echo` with `logprobs`
is refused (the prompt's logprobs are not computed).

`max_tokens` left out: 16 for completions (OpenAI's default), the rest of the context for chat;
either is cut to the room the prompt leaves. A given `max_tokens` that does not fit is an error.

Every request but /health and /metrics is one log line (logger "latentformer.serve", INFO): id,
status, method and path, prompt and completion tokens, time to first token (streams), duration.
`Server` runs the app under uvicorn with the limits a server on a network needs (see `Server`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from latentformer.infer.chat import chat_stops, check_messages, has_template, render_chat
from latentformer.infer.detokenize import token_bytes
from latentformer.infer.engine import MAX_LOGPROBS, Engine, Event, QueueFull, Request
from latentformer.serve.worker import EngineClient, EngineProcess

log = logging.getLogger("latentformer.serve")

MAX_BODY_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 10  # request line + headers; nginx's large_client_header_buffers allow 4 x 8 KiB
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS = 4  # as OpenAI
MAX_N = 128  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # as OpenAI's legacy completions (chat's top_logprobs: MAX_LOGPROBS, 20 as OpenAI)
RETRY_AFTER_SECONDS = 1  # a full queue drains in about a request's time
SHUTDOWN = "the server is shutting down"
UNAUTHENTICATED = {"/health"}  # liveness probes carry no key

# OpenAI parameters this server does not implement, with the values that mean "off" (accepted);
# echo is implemented for completions (a field of CompletionRequest) and stays refused for chat;
# logprobs and top_logprobs are fields of the requests (their meanings differ between the two)
UNSUPPORTED: dict[str, tuple] = {
    "echo": (None, False), "best_of": (None, 1),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status,
                        headers=headers)


# -- request schemas ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    """Fields common to both endpoints; null means the default."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's int64; taken mod 2^64: one seed, one stream
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class ChatRequest(_Sampling):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = str(err["loc"][0]) if err["loc"] else None  # the top-level field (a union adds its member's name)
    if err["type"] == "missing":
        return ApiError(400, f"missing required parameter: {param}", param)
    return ApiError(400, f"invalid value for {param}: {err['msg']}", param)


def _parse(schema: type[_Sampling], body: dict) -> _Sampling:
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise ApiError(400, f"{name} is not supported by this server", name)
    return req


# -- metrics and the log line of a request --------------------------------------------------------
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps may share a process).
    Running/waiting count every HTTP process's requests (the engine's count is shared); the
    counters and histograms are this process's."""

    def __init__(self, engine: Engine | EngineClient) -> None:
        r = self.registry = CollectorRegistry()
        Gauge("latentformer_requests_running", "requests in the decode batch", registry=r).set_function(lambda: engine.active)
        Gauge("latentformer_requests_waiting", "requests waiting for a row of the batch", registry=r).set_function(
            lambda: engine.queued)
        Gauge("latentformer_batch_rows", "rows of the decode batch, preallocated in the cache (--max-batch)",
              registry=r).set(engine.max_batch)
        Gauge("latentformer_cache_usage_ratio", "share of the cache's rows in use", registry=r).set_function(
            lambda: engine.active / engine.max_batch)
        self.requests = Counter("latentformer_requests", "HTTP requests answered, by status", ["status"], registry=r)
        self.prompt_tokens = Counter("latentformer_prompt_tokens", "prompt tokens of the requests run", registry=r)
        self.generation_tokens = Counter("latentformer_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("latentformer_time_to_first_token_seconds", "arrival to first text of a stream",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("latentformer_inter_token_latency_seconds", "time between a stream's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("latentformer_request_duration_seconds", "arrival to last byte of a request",
                                  buckets=_LATENCY_BUCKETS, registry=r)


@dataclass
class _Record:
    """What one request's log line says; the middleware makes it, the handlers fill it in."""

    start: float
    id: str
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    note: str = ""

    def line(self, method: str, path: str, duration: float) -> str:
        ttft = "-" if self.ttft is None else f"{self.ttft:.3f}s"
        return (f"{self.id} {self.status} {method} {path} prompt_tokens={self.prompt_tokens} "
                f"completion_tokens={self.completion_tokens} ttft={ttft} duration={duration:.3f}s"
                + (f" ({self.note})" if self.note else ""))


class _Tokens:
    """Per-choice token times of one request, for the TTFT and inter-token metrics (streams)."""

    def __init__(self, record: _Record, metrics: Metrics, n: int, stream: bool) -> None:
        self.record, self.metrics, self.stream = record, metrics, stream
        self.counts, self.times = [0] * n, [record.start] * n

    def observe(self, i: int, event: Event) -> None:
        now, new = time.monotonic(), event.completion_tokens - self.counts[i]
        if self.stream and new > 0:
            if self.counts[i] > 0:  # the tokens that came together share the gap since the last ones
                for _ in range(new):
                    self.metrics.itl.observe((now - self.times[i]) / new)
            elif self.record.ttft is None:
                self.record.ttft = now - self.record.start
                self.metrics.ttft.observe(self.record.ttft)
        self.counts[i], self.times[i] = max(self.counts[i], event.completion_tokens), now


class _Logprobs:
    """OpenAI's logprobs objects from the engine's (id, logprob, top) per token (see `Event`), for
    one choice's tokens at a time; a choice's text_offset goes on across calls (a stream's chunks).

    A token's text is its bytes decoded alone; a token that is not whole UTF-8 (a piece of a
    multi-byte character) reads as "bytes:" and its bytes escaped (e.g. "bytes:\\xe2\\x80"), so
    that distinct tokens never share a key of a top_logprobs dict. text_offset[j] is the index in
    the text of the character where token j's bytes start (the characters of the tokens before it,
    decoded together: the pieces of one character count once)."""

    def __init__(self, tokenizer, n: int) -> None:
        self.bytes = token_bytes(tokenizer)
        self.offsets = [0] * n
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]

    def text(self, token: int) -> str:
        b = self.bytes(token)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + b.decode("utf-8", errors="backslashreplace")

    def completion(self, i: int, logprobs: list) -> dict:
        """Legacy completions: the top dict holds the k most likely tokens and the chosen one."""
        tokens, offsets = [self.text(t) for t, _, _ in logprobs], []
        for t, _, _ in logprobs:
            offsets.append(self.offsets[i])
            self.offsets[i] += len(self.decoders[i].decode(self.bytes(t)))
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in logprobs],
                "top_logprobs": [{**{self.text(u): v for u, v in top}, token: lp}
                                 for token, (_, lp, top) in zip(tokens, logprobs)],
                "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}

    def chat(self, logprobs: list) -> dict:
        return {"content": [{**self._entry(t, lp), "top_logprobs": [self._entry(u, v) for u, v in top]}
                            for t, lp, top in logprobs]}

    def of(self, chat: bool, i: int, logprobs: list) -> dict:
        return self.chat(logprobs) if chat else self.completion(i, logprobs)


# -- the app ------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware around every request: the API key (401; not for /health) and the body-size
    limit by Content-Length (413) before any handler runs (the handlers also count the bytes of
    bodies sent without a length); an unexpected exception becomes a 500 in OpenAI's shape on a
    connection that stays open (logged with its traceback: a bug), a request cancelled by
    shutdown ends quietly; then the request's log line and metrics."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = scope["latentformer"] = _Record(time.monotonic(), f"req-{uuid.uuid4().hex[:16]}")
        started = False

        async def send_status(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started, record.status = True, message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout: the reply cannot be finished
            record.status, record.note = record.status or 499, "cancelled at shutdown"
        except Exception:  # noqa: BLE001 - a bug: its traceback, and a reply that keeps the connection
            log.exception("%s: internal error", record.id)
            if not started:
                await error_response(500, "internal error", type="server_error")(scope, receive, send_status)
        path = scope["path"]
        if path not in ("/health", "/metrics"):
            duration = time.monotonic() - record.start
            self.metrics.requests.labels(str(record.status)).inc()
            self.metrics.duration.observe(duration)
            log.info(record.line(scope["method"], path, duration))

    async def _guarded(self, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in UNAUTHENTICATED:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                            code="invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _too_large(self.max_body_bytes).response()(scope, receive, send)
        await self.app(scope, receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")


def _engine_up(engine: Engine | EngineClient) -> bool:
    return engine.alive if isinstance(engine, EngineClient) else True


def create_app(engine: Engine | EngineProcess, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name` (an `Engine` in this process, or the
    `EngineProcess` that `latentformer serve` runs). Its lifespan starts the engine and hands it
    this event loop for delivering tokens (one wake-up per decode step). `app.state.abort()` ends
    every request in flight with an error (what `Server` does when its drain time is up)."""
    tokenizer, context = engine.tokenizer, engine.context
    created = int(time.time())
    metrics = Metrics(engine)
    inflight: set[Request] = set()

    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def dispatch(batch: list[tuple[Request, Event]]) -> None:
            for request, event in batch:
                request.sink(event)

        engine.deliver = lambda batch: loop.call_soon_threadsafe(dispatch, batch)
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="latentformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    def abort() -> None:
        for job in list(inflight):
            engine.cancel(job)
            job.sink(Event("", "error", 0, SHUTDOWN))

    app.state.abort = abort

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code=None)

    async def read_json(http: HTTPRequest) -> dict:
        body = bytearray()
        try:
            async for chunk in http.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise _too_large(max_body_bytes)
        except ClientDisconnect:  # went away, or cut by the server's read timeout: nobody reads a reply
            http.scope["latentformer"].note = "the connection closed before the request body arrived"
            raise ApiError(499, "the connection closed before the request body arrived") from None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            obj = json.loads(text)
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, or an integer literal over Python's digit limit
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return obj

    def check_model(req: _Sampling) -> None:
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def fit(ids: list[int], asked: int | None, default: int) -> int:
        """max_tokens for a prompt of len(ids) tokens (see the module docstring)."""
        room = context - len(ids)
        if asked is None and room >= 1:
            return min(default, room)
        if asked is None or len(ids) + asked > context:
            need = len(ids) + (asked or 1)
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the request needs {need} "
                                f"({len(ids)} in the prompt, {asked or 1} for the completion): shorten the prompt or "
                                "lower max_tokens", "max_tokens" if asked and room >= 1 else "prompt", "context_length_exceeded")
        return asked

    def stops_of(req: _Sampling) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
        return stops

    def submit(jobs: list[Request]) -> None:
        """All of `jobs` into the engine, or none."""
        for k, job in enumerate(jobs):
            try:
                engine.submit(job)
            except (QueueFull, RuntimeError) as e:
                for taken in jobs[:k]:
                    engine.cancel(taken)
                if isinstance(e, QueueFull):
                    raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                                   type="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
                raise ApiError(503, f"the engine is not running ({e})", code="engine_error", type="server_error") from None

    async def run(http: HTTPRequest, req: _Sampling, ids: list[int], max_tokens: int, stops: list[str], chat: bool,
                  logprobs: int | None, echo: str = ""):
        n = req.n or 1
        if n > engine.max_batch + engine.max_queue:
            raise ApiError(400, f"n={n} exceeds the {engine.max_batch + engine.max_queue} requests this server holds "
                                "at once (--max-batch + --max-queue)", "n")
        record: _Record = http.scope["latentformer"]
        record.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        record.prompt_tokens = len(ids)
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # only the most likely token is left
            temperature, top_p = 0.0, 1.0
        try:
            jobs = [Request(ids, max_tokens, lambda event, i=i: queue.put_nowait((i, event)), temperature, top_p,
                            None if req.seed is None else (req.seed + i) % 2**64, stops, stream=bool(req.stream),
                            logprobs=logprobs)
                    for i in range(n)]
        except ValueError as e:  # sampling settings no distribution can follow (e.g. top_p below float32's range)
            raise ApiError(400, str(e), str(e).split()[0]) from None
        submit(jobs)
        inflight.update(jobs)
        metrics.prompt_tokens.inc(len(ids) * n)
        tokens = _Tokens(record, metrics, n, bool(req.stream))
        formats = None if logprobs is None else _Logprobs(tokenizer, n)
        meta = dict(id=record.id, created=int(time.time()), model=model_name,
                    object="chat.completion" if chat else "text_completion")

        def done() -> None:  # the request's end, however it ends
            for job in jobs:
                engine.cancel(job)  # a no-op for a finished request; frees the row of one whose client went away
            inflight.difference_update(jobs)
            record.completion_tokens = sum(tokens.counts)
            metrics.generation_tokens.inc(record.completion_tokens)

        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(queue, tokens, done, meta, chat, usage, len(ids), echo, formats),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(http, queue, tokens, done, meta, chat, len(ids), echo, formats)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        req = _parse(CompletionRequest, await read_json(http))
        check_model(req)
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo together with logprobs is not supported (the prompt's logprobs are not computed): "
                                "drop echo or logprobs", "echo")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of several prompts is not supported)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt) or [tokenizer.eot_id]  # an empty prompt starts at end-of-text, as generate
        else:
            if not prompt or not all(0 <= i < tokenizer.vocab_size for i in prompt):
                raise ApiError(400, f"a token-id prompt must be a non-empty list of ids in [0, {tokenizer.vocab_size})", "prompt")
            ids = list(prompt)
        max_tokens = fit(ids, req.max_tokens, DEFAULT_COMPLETION_TOKENS)
        echo = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if req.echo else ""
        return await run(http, req, ids, max_tokens, stops_of(req), chat=False, logprobs=req.logprobs, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        req = _parse(ChatRequest, await read_json(http))
        check_model(req)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        try:
            prompt = render_chat(tokenizer, check_messages([_text_message(m) for m in req.messages]))
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = fit(ids, asked, context)
        return await run(http, req, ids, max_tokens, [*chat_stops(tokenizer), *stops_of(req)], chat=True,
                         logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "latentformer",
            "context_length": context, "attention": engine.config.attention,
            "chat_template": has_template(tokenizer), "base_model": not has_template(tokenizer)}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        if not _engine_up(engine):
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    return app


def _text_message(message: Any) -> Any:
    """OpenAI content parts [{"type": "text", "text": ...}, ...] -> one string; other forms pass to check_messages."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            raise ApiError(400, "only text content parts are supported", "messages")
        return {**message, "content": "".join(p["text"] for p in parts)}
    return message


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _engine_error(event: Event) -> ApiError:
    return ApiError(503, f"generation failed: {event.error}", code="engine_error", type="server_error")


async def _until_disconnect(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _collect(queue: asyncio.Queue, tokens: _Tokens) -> list[tuple[str, Event, list]]:
    """Every choice's text, last event and logprobs."""
    n = len(tokens.counts)
    pieces: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    last: list[Event | None] = [None] * n
    while None in last:
        i, event = await queue.get()
        if last[i] is None:
            tokens.observe(i, event)
            pieces[i].append(event.text)
            logprobs[i].extend(event.logprobs)
            if event.finish_reason:
                last[i] = event
    return [("".join(p), e, lp) for p, e, lp in zip(pieces, last, logprobs)]


async def _complete(http: HTTPRequest, queue: asyncio.Queue, tokens: _Tokens, done, meta: dict, chat: bool,
                    prompt_tokens: int, echo: str, formats: _Logprobs | None):
    """The whole completion as one JSON object; a client that goes away cancels its request."""
    collect, gone = asyncio.ensure_future(_collect(queue, tokens)), asyncio.ensure_future(_until_disconnect(http))
    try:
        finished, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        collect.cancel()
        done()
    if collect not in finished:
        tokens.record.note = "client went away"
        return JSONResponse({}, status_code=499)  # nobody reads this
    results = collect.result()
    for _, last, _ in results:
        if last.finish_reason == "error":
            raise _engine_error(last)
    choices = []
    for i, (text, last, logprobs) in enumerate(results):
        choice: dict[str, Any] = {"index": i, "finish_reason": last.finish_reason,
                                  "logprobs": None if formats is None else formats.of(chat, i, logprobs)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = echo + text
        choices.append(choice)
    return {**meta, "choices": choices, "usage": _usage(prompt_tokens, sum(last.completion_tokens for _, last, _ in results))}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(queue: asyncio.Queue, tokens: _Tokens, done, meta: dict, chat: bool, usage: bool, prompt_tokens: int,
                  echo: str, formats: _Logprobs | None):
    """Server-sent events: one chunk per choice per delivery (increments that queued up meanwhile
    are sent together, with their tokens' logprobs when asked: a chunk may then carry tokens whose
    text is still held back), the finish_reason in a choice's last, then optional usage and
    `data: [DONE]`. An error (the engine's, or shutdown's) is an error event, then [DONE]. Closing
    the connection cancels the generator here and so the requests in the engine."""
    n = len(tokens.counts)
    meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    # the common chunk (text, no finish_reason) is formatted from fixed parts: it is sent once per
    # token per client, the server's main cost per token after the model
    prefix = "data: " + json.dumps(meta)[:-1] + ', "choices": [{"index": '
    heads = [prefix + f'{i}, ' + ('"delta": {"content": ' if chat else '"text": ') for i in range(n)]
    tail = ("}" if chat else "") + ', "finish_reason": null, "logprobs": null}]' + (', "usage": null' if usage else "") + "}\n\n"

    def chunk(i: int, text: str | None, reason: str | None, role: bool = False, logprobs: list | None = None) -> str:
        if text and reason is None and not role and not logprobs:
            return heads[i] + json.dumps(text, ensure_ascii=False) + tail
        lp = formats.of(chat, i, logprobs) if logprobs else None
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": lp}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lp}
        return _sse({**meta, "choices": [choice]} | ({"usage": None} if usage else {}))

    try:
        for i in range(n):
            if chat:
                yield chunk(i, None, None, role=True)
            elif echo:
                yield chunk(i, echo, None)
        finished: list[Event | None] = [None] * n
        while None in finished:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            by_choice: dict[int, list[Event]] = {}
            for i, event in items:
                if finished[i] is None and not (by_choice.get(i) and by_choice[i][-1].finish_reason):
                    tokens.observe(i, event)
                    by_choice.setdefault(i, []).append(event)
            for i, events in by_choice.items():
                last, text = events[-1], "".join(e.text for e in events)
                logprobs = [lp for e in events for lp in e.logprobs]
                if last.finish_reason == "error":
                    e = _engine_error(last)
                    yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
                    yield _sse("[DONE]")
                    return
                if text and last.finish_reason:
                    yield chunk(i, text, None, logprobs=logprobs)
                    text, logprobs = "", []
                if text or logprobs or last.finish_reason:
                    yield chunk(i, text if text or logprobs or not chat else None, last.finish_reason, logprobs=logprobs)
                if last.finish_reason:
                    finished[i] = last
        if usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompt_tokens, sum(e.completion_tokens for e in finished))})
        yield _sse("[DONE]")
    finally:
        done()


# -- uvicorn, with the limits of a server on a network ---------------------------------------------
class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits it lacks (h11's `h11_max_incomplete_event_size`
    has no httptools counterpart). `max_header_bytes`: a request line and headers over it get 431
    and a closed connection; counted as the bytes arrive, so a 60 MiB header is refused after about
    this much (httptools would buffer it whole). `read_timeout`: a request must arrive whole within
    that many seconds of its first byte; if not, its connection is closed (a 408 when its headers
    were incomplete; a handler waiting for the body sees a disconnect). A connection that never
    sends a byte is closed after the same time, silently. `max_connections`: a request on a
    connection beyond that many is answered 503 (in OpenAI's shape) and its connection closed, so
    that idle or slow clients cannot use up the process's file descriptors. Each refusal is one
    warning line."""

    max_header_bytes = MAX_HEADER_BYTES
    read_timeout = 30.0
    max_connections = 1024

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_bytes, self._exact, self._in_headers, self._refused = 0, 0, False, False
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._disarm()
        if self.transport.is_closing():  # uvicorn refused it already (a parse error)
            return
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                                     "param": None, "code": None}}).encode()
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                             "connection: close\r\n\r\n".encode() + body)
        self.transport.close()
        log.warning("%s %s: %s", self._peer(), status, message)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._refused or self.transport.is_closing():
            return
        if self._in_headers:
            return self._refuse(408, "Request Timeout", f"the request did not arrive within {self.read_timeout:g} s")
        self.transport.close()  # nothing sent (quietly), or a body that stopped: its handler logs it

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._arm()
        super().data_received(data)
        if self._in_headers and not self._refused:  # all of `data` was headers, still incomplete
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large", f"the request's headers exceed {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0
        self._exact = 0  # the parsed request line and headers (exact once they are complete)

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            self._exact += len(url)
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            self._exact += len(name) + len(value) + 4
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._refused:
            return
        if self._exact > self.max_header_bytes:
            return self._refuse(431, "Request Header Fields Too Large", f"the request's headers exceed {self.max_header_bytes} bytes")
        if len(self.connections) > self.max_connections:
            return self._refuse(503, "Service Unavailable", f"the server has {self.max_connections} connections open "
                                                            "already; retry later")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self._refused:
            super().on_message_complete()


class Server(uvicorn.Server):
    """uvicorn serving an app of `create_app` with `_HttpProtocol`'s limits. On SIGINT/SIGTERM (or
    `should_exit`) it stops accepting, lets the requests in flight run for up to `drain` seconds,
    then ends the rest with an error (OpenAI's shape; an error event and `[DONE]` for a stream)
    and gives those replies 5 s more to go out before uvicorn cancels what is left."""

    def __init__(self, app: FastAPI, drain: float = 10.0, read_timeout: float = 30.0,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_connections: int = 1024) -> None:
        protocol = type("HttpProtocol", (_HttpProtocol,), {
            "read_timeout": read_timeout, "max_header_bytes": max_header_bytes, "max_connections": max_connections})
        super().__init__(uvicorn.Config(app, http=protocol, log_level="warning", access_log=False,
                                        timeout_graceful_shutdown=drain + 5))
        self.drain, self.abort = drain, app.state.abort

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT/SIGTERM start the graceful shutdown (uvicorn's `handle_exit`), and `signal` says
        which came. Unlike uvicorn's own, the signal is not raised again once the server has stopped:
        the process then ends by a normal exit (`finally` blocks and atexit run, so multiprocessing
        unlinks its semaphores instead of its resource tracker warning of leaked ones) with the
        status a signal would give (`latentformer serve` returns 128 + its number)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def signal(self) -> int | None:
        """The signal that stopped the server (None: another reason, or none yet)."""
        return self._captured_signals[-1] if self._captured_signals else None

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain, self.abort)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
