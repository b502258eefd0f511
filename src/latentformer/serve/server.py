"""An OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both also as server-sent events
with `"stream": true`, ending in `data: [DONE]`), GET /v1/models, GET /health.

Requests are validated strictly (pydantic strict mode: no "5" for 5, no 0 for false); every
rejection is a 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}:
400 for bad JSON, non-UTF-8 bodies, wrong types or ranges, n != 1, a known OpenAI parameter
this server does not implement (logprobs, echo, penalties, tools, ...: named in the message),
and prompts that do not fit the context (code "context_length_exceeded"; prompts are never
truncated silently); 401 without the API key; 404 for another model name; 413 for bodies over
`max_body_bytes`; 429 when the engine's queue is full. Unknown fields are ignored.

`max_tokens` left out: 16 for completions (OpenAI's default), the rest of the context for chat;
either is cut to the room the prompt leaves. A given `max_tokens` that does not fit is an error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentformer.infer.chat import chat_stops, check_messages, has_template, render_chat
from latentformer.infer.engine import Engine, Event, QueueFull, Request
from latentformer.serve.worker import EngineProcess

MAX_BODY_BYTES = 1 << 20
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS = 4  # as OpenAI

# OpenAI parameters this server does not implement, with the values that mean "off" (accepted)
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


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
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]


class ChatRequest(_Sampling):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


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
    if req.n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    return req


# -- the app ------------------------------------------------------------------------------------
class _Guard:
    """ASGI middleware: the API key (401) and the body-size limit by Content-Length (413) before any
    handler runs; the handlers also count the bytes of bodies sent without a length."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.api_key is not None:
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


def create_app(engine: Engine | EngineProcess, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name` (an `Engine` in this process, or the
    `EngineProcess` that `latentformer serve` runs). Its lifespan starts the engine and hands it
    this event loop for delivering tokens (one wake-up per decode step)."""
    tokenizer, context = engine.tokenizer, engine.context
    created = int(time.time())

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
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code=None)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", type="server_error")

    async def read_json(http: HTTPRequest) -> dict:
        body = bytearray()
        async for chunk in http.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise _too_large(max_body_bytes)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
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

    async def run(http: HTTPRequest, req: _Sampling, ids: list[int], max_tokens: int, stops: list[str], chat: bool):
        queue: asyncio.Queue[Event] = asyncio.Queue()
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # only the most likely token is left
            temperature, top_p = 0.0, 1.0
        try:
            job = Request(ids, max_tokens, queue.put_nowait, temperature, top_p,
                          None if req.seed is None else req.seed % 2**64, stops, stream=bool(req.stream))
        except ValueError as e:  # sampling settings no distribution can follow (e.g. top_p below float32's range)
            raise ApiError(400, str(e), str(e).split()[0]) from None
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded", type="rate_limit_error") from None
        meta = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()), model=model_name,
                    object="chat.completion" if chat else "text_completion")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(engine, job, queue, meta, chat, usage, len(ids)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(http, engine, job, queue, meta, chat, len(ids))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        req = _parse(CompletionRequest, await read_json(http))
        check_model(req)
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
        return await run(http, req, ids, max_tokens, stops_of(req), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        req = _parse(ChatRequest, await read_json(http))
        check_model(req)
        try:
            prompt = render_chat(tokenizer, check_messages([_text_message(m) for m in req.messages]))
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = fit(ids, asked, context)
        return await run(http, req, ids, max_tokens, [*chat_stops(tokenizer), *stops_of(req)], chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "latentformer",
            "context_length": context, "attention": engine.config.attention,
            "chat_template": has_template(tokenizer), "base_model": not has_template(tokenizer)}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "queued": engine.queued, "max_batch": engine.max_batch}

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


async def _collect(queue: asyncio.Queue) -> tuple[str, Event]:
    pieces = []
    while True:
        event = await queue.get()
        pieces.append(event.text)
        if event.finish_reason:
            return "".join(pieces), event


async def _complete(http: HTTPRequest, engine: Engine, job: Request, queue: asyncio.Queue, meta: dict, chat: bool, prompt_tokens: int):
    """The whole completion as one JSON object; a client that goes away cancels its request."""
    collect, gone = asyncio.ensure_future(_collect(queue)), asyncio.ensure_future(_until_disconnect(http))
    try:
        done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            engine.cancel(job)
    if collect not in done:
        return JSONResponse({}, status_code=499)  # the client went away: nobody reads this
    text, last = collect.result()
    if last.finish_reason == "error":
        raise _engine_error(last)
    choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**meta, "choices": [choice], "usage": _usage(prompt_tokens, last.completion_tokens)}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, job: Request, queue: asyncio.Queue, meta: dict, chat: bool, usage: bool, prompt_tokens: int):
    """Server-sent events: one chunk per delivery (increments that queued up meanwhile are sent
    together), the finish_reason in the last, then optional usage and `data: [DONE]`. Closing the
    connection cancels the generator here and so the request in the engine."""
    meta = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    # the common chunk (text, no finish_reason) is formatted from fixed parts: it is sent once per
    # token per client, the server's main cost per token after the model
    head = "data: " + json.dumps(meta)[:-1] + ', "choices": [{"index": 0, ' + ('"delta": {"content": ' if chat else '"text": ')
    tail = ("}" if chat else "") + ', "finish_reason": null, "logprobs": null}]' + (', "usage": null' if usage else "") + "}\n\n"

    def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
        if text and reason is None and not role:
            return head + json.dumps(text, ensure_ascii=False) + tail
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return _sse({**meta, "choices": [choice]} | ({"usage": None} if usage else {}))

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            events = [await queue.get()]
            while not events[-1].finish_reason and not queue.empty():
                events.append(queue.get_nowait())
            last, text = events[-1], "".join(e.text for e in events)
            if last.finish_reason == "error":
                e = _engine_error(last)
                yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
                break
            if text and last.finish_reason:
                yield chunk(text, None)
                text = ""
            if text or last.finish_reason:
                yield chunk(text if text or not chat else None, last.finish_reason)
            if last.finish_reason:
                if usage:
                    yield _sse({**meta, "choices": [], "usage": _usage(prompt_tokens, last.completion_tokens)})
                break
        yield _sse("[DONE]")
    finally:
        engine.cancel(job)  # a no-op for a finished request; frees the row of one whose client went away
