"""The engine in a process of its own, behind the interface of `Engine` that the server uses.

In one process the HTTP event loop and the engine thread share the GIL: with 64 concurrent
streams the loop's Python work per chunk (queue, SSE formatting, socket write) holds the GIL for
longer than the GPU's decode step, and the engine thread waits for it (measured on an H200: each
request decoded 3.5x slower than the engine alone; benchmarks/RESULTS.md, "Serve"). Here the
engine (model, cache, scheduling, sampling, detokenizing) runs in a child process and the server
process only speaks HTTP, so neither waits for the other's Python. Between them: requests go down
a pipe as plain tuples; each engine step's events come back as one message, sent by a thread of
the child (the engine never blocks on a slow reader); a request the client abandons is cancelled
by id. The server applies the queue limit itself (rows + `max_queue` requests in flight), so a
full queue is still an immediate 429.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from latentformer.infer.engine import Event, QueueFull, Request


UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build the engine: the checkpoint and the engine's settings."""

    path: str
    device: str | None
    dtype: str | None
    max_batch: int
    max_queue: int
    compile: bool
    stream_interval: float


@dataclass(frozen=True)
class EngineInfo:
    """What the child reports once the model is loaded and the cache allocated."""

    config: object  # the model's ModelConfig
    params: int
    cache_bytes: int
    context: int


def _child(spec: EngineSpec, commands, events) -> None:
    """The engine process: load, report, then serve commands until "stop" or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us in order
    from argparse import Namespace

    from latentformer.cli.generate import load_from_args
    from latentformer.infer.engine import Engine

    outbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        model, tokenizer = load_from_args(Namespace(path=spec.path, device=spec.device, dtype=spec.dtype))
        # the server process applies --max-queue (a request it cancelled may still sit in this queue)
        engine = Engine(model, tokenizer, max_batch=spec.max_batch, max_queue=UNBOUNDED, compile=spec.compile,
                        stream_interval=spec.stream_interval)
    except Exception as e:  # noqa: BLE001 - reported to the server as one line
        events.send(("error", str(e) or type(e).__name__))
        return
    ids: dict[Request, int] = {}  # the requests in the engine; both maps are edited by two threads, one key at a time
    by_id: dict[int, Request] = {}

    def deliver(batch: list[tuple[Request, Event]]) -> None:  # the engine thread
        out = []
        for request, event in batch:
            rid = ids.pop(request, None) if event.finish_reason else ids.get(request)
            if rid is not None:
                out.append((rid, event))
                if event.finish_reason:
                    by_id.pop(rid, None)
        if out:
            outbox.put(out)

    engine.deliver = deliver

    def send() -> None:
        while (batch := outbox.get()) is not None:
            events.send(batch)

    sender = threading.Thread(target=send, name="latentformer-engine-sender", daemon=True)
    sender.start()
    events.send(("ready", EngineInfo(model.config, model.num_params(), engine.cache.nbytes, engine.context)))
    engine.start()
    try:
        while True:
            try:
                message = commands.recv()
            except EOFError:
                break
            if message[0] == "submit":
                _, rid, fields = message
                request = Request(sink=None, **fields)
                ids[request], by_id[rid] = rid, request
                try:
                    engine.submit(request)
                except (ValueError, RuntimeError) as e:  # checked by the server already; never fatal here
                    deliver([(request, Event("", "error", 0, str(e)))])
            elif message[0] == "cancel":
                request = by_id.pop(message[1], None)
                if request is not None:
                    ids.pop(request, None)
                    request.cancel()  # the engine frees its row without an event
            else:
                break
    finally:
        engine.stop()  # tells the requests in flight
        outbox.put(None)
        sender.join()


class EngineProcess:
    """`Engine`'s serving interface (`submit`, `cancel`, `deliver`, `start`, `stop`, `active`,
    `queued`, `max_batch`, `context`, `config`, `tokenizer`) over an engine in a child process."""

    def __init__(self, spec: EngineSpec, tokenizer) -> None:
        self.tokenizer, self.max_batch, self.max_queue = tokenizer, spec.max_batch, spec.max_queue
        self.deliver: Callable[[list[tuple[Request, Event]]], None] = lambda batch: None
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        commands_out, commands_in = ctx.Pipe(duplex=False)
        self._events, events_in = ctx.Pipe(duplex=False)
        self._commands = commands_in
        self._proc = ctx.Process(target=_child, args=(spec, commands_out, events_in), name="latentformer-engine", daemon=True)
        self._proc.start()
        commands_out.close()
        events_in.close()
        try:
            kind, payload = self._events.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited with {self._proc.join(5) or self._proc.exitcode}") from None
        if kind == "error":
            self._proc.join(5)
            raise ValueError(payload)
        self.info: EngineInfo = payload
        self.config, self.context = payload.config, payload.context
        self._requests: dict[int, Request] = {}  # in flight, by id
        self._rid: dict[Request, int] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="latentformer-engine-reader", daemon=True)

    def start(self) -> EngineProcess:
        self._reader.start()
        return self

    def stop(self) -> None:
        try:
            self._commands.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        if self._reader.is_alive():
            self._reader.join(5)

    def submit(self, request: Request) -> None:
        """As `Engine.submit`: ValueError for a prompt that does not fit, QueueFull past the limit."""
        if not request.ids or len(request.ids) + request.max_tokens > self.context or request.max_tokens < 1:
            raise ValueError(f"a request needs 1 <= prompt tokens and prompt + max_tokens <= {self.context}, "
                             f"got {len(request.ids)} + {request.max_tokens}")
        with self._lock:
            if len(self._requests) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self._requests) - self.max_batch} requests are waiting already "
                                f"(--max-queue {self.max_queue})")
            rid = next(self._ids)
            self._requests[rid], self._rid[request] = request, rid
        fields = dict(ids=request.ids, max_tokens=request.max_tokens, temperature=request.temperature,
                      top_p=request.top_p, seed=request.seed, stops=request.stops, stream=request.stream)
        self._commands.send(("submit", rid, fields))

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (a no-op once it has finished); no event follows."""
        request.cancel()
        with self._lock:
            rid = self._rid.pop(request, None)
            if rid is None:
                return
            del self._requests[rid]
        self._commands.send(("cancel", rid))

    @property
    def active(self) -> int:
        return min(len(self._requests), self.max_batch)

    @property
    def queued(self) -> int:
        return max(0, len(self._requests) - self.max_batch)

    def _read(self) -> None:
        """Each message is one engine step's events: hand them to `deliver` in one call."""
        while True:
            try:
                batch = self._events.recv()
            except (EOFError, OSError):
                break
            out = []
            with self._lock:
                for rid, event in batch:
                    request = self._requests.pop(rid, None) if event.finish_reason else self._requests.get(rid)
                    if request is not None:
                        out.append((request, event))
                        if event.finish_reason:
                            del self._rid[request]
            if out:
                self.deliver(out)
        with self._lock:  # the engine process is gone: every request still waiting fails
            left, self._requests, self._rid = list(self._requests.values()), {}, {}
        if left:
            self.deliver([(r, Event("", "error", 0, "the engine process stopped")) for r in left])
