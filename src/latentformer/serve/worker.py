"""The engine in a process of its own, behind the interface of `Engine` that the server uses.

In one process the HTTP event loop and the engine thread share the GIL: with 64 concurrent
streams the loop's Python work per chunk (queue, SSE formatting, socket write) holds the GIL for
longer than the GPU's decode step, and the engine thread waits for it (measured on an H200: each
request decoded 3.5x slower than the engine alone; benchmarks/RESULTS.md, "Serve"). Here the
engine (model, cache, scheduling, sampling, detokenizing) runs in a child process and the server
process only speaks HTTP, so neither waits for the other's Python. Between them: requests go down
a pipe as plain tuples; each engine step's events come back as one message of plain tuples
(rid, ids, finish_reason, tokens, error, logprobs), about ten times cheaper to pickle than Event objects
(64 rows: 30 -> 3 us on a 2-core CPU),
sent by a thread of the child (the engine never blocks on a slow reader) whose pickling shares the
engine thread's GIL; a request the client abandons is cancelled
by id. The server applies the queue limit itself (rows + `max_queue` requests in flight), so a
full queue is still an immediate 429.

One engine serves several HTTP processes (`latentformer serve --api-processes N`): each has a
`Channel` of its own (two pipes and its slot in a shared count of requests in flight). One Python
process writes some tens of thousands of stream chunks a second (~35 us each measured on a 2-core
CPU, most of it the socket write), fewer than 64 streams of a ~1 ms decode step ask for; N
processes accepting on one listening socket share that work. The queue limit is
checked against the sum of the slots under the array's lock, so it holds across processes. An
HTTP process that dies loses only its own requests: the engine cancels them and clears its slot.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from latentformer.infer.detokenize import RowText
from latentformer.infer.engine import Event, QueueFull, Request

UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build the engine: the checkpoint and the engine's settings."""

    path: str
    device: str | None
    dtype: str | None
    max_batch: int | None  # None: sized to the device and the model (`serve.sizing.default_max_batch`)
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
    max_batch: int
    sizing: str  # why max_batch is what it is
    threads: int  # torch's intra-op threads in the engine process


@dataclass
class Channel:
    """What one HTTP process needs to reach the engine: its command and event pipe ends, the
    shared count of requests in flight (one slot per HTTP process) and its slot. Picklable into a
    spawned process."""

    commands: Any  # multiprocessing Connection, send side
    events: Any  # multiprocessing Connection, receive side
    in_flight: Any  # multiprocessing Array('i', processes), with its lock
    slot: int

    def close(self) -> None:
        """Close this process's copy of the pipes once the channel is handed to its HTTP process:
        the engine sees that process's exit only when every copy of its command pipe is closed."""
        self.commands.close()
        self.events.close()


def _on_cpu(device: str | None) -> bool:
    """Whether an engine given --device `device` (None: the default, CUDA when there is one) runs on the CPU."""
    import torch

    return not (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith(("cuda", "mps"))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_http_processes(device: str | None) -> int:
    """`serve`'s HTTP processes when --api-processes is not given: 1 for a CPU engine (the cores are
    the model's), else one per 4 cores up to 4. A GPU engine turns a request around faster than one
    HTTP process parses, streams and detokenizes for it (mla-125m on an H100, 256 clients, 128-token
    prompts: 0.51x of offline with one process, 0.75x with four; benchmarks/RESULTS.md, "Serve")."""
    return 1 if _on_cpu(device) else max(1, min(4, _cores() // 4))


def engine_threads(device: str | None, http_processes: int) -> int | None:
    """torch's intra-op threads for an engine on the CPU: the cores this process may use less one
    per HTTP process (they stream the text), at least 1; None (torch's default) for a GPU engine or
    when OMP_NUM_THREADS says. A decode step's small ops wait for every OpenMP thread: a thread
    descheduled by an HTTP process stalls the step (2-core CPU, tiny preset, 4 clients: 517 served
    tok/s with 2 threads, 1,199 with 1; benchmarks/RESULTS.md, "Serve")."""
    if "OMP_NUM_THREADS" in os.environ or not _on_cpu(device):
        return None
    return max(1, _cores() - http_processes)


def _child(spec: EngineSpec, channels: list[tuple[Any, Any]], in_flight) -> None:
    """The engine process: load, report on every channel, then serve the channels' commands
    until "stop" or until every channel has closed. channels[i] = (commands in, events out)."""
    # Ctrl-C and a supervisor's SIGTERM to the whole process group go to the server, which drains and
    # then stops us in order (we also stop when every command pipe closes, e.g. the server was killed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from latentformer.checkpoint import load
    from latentformer.infer.engine import Engine
    from latentformer.serve.sizing import default_max_batch

    outboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in channels]
    threads = engine_threads(spec.device, len(channels))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model, tokenizer = load(spec.path, spec.device, getattr(torch, spec.dtype) if spec.dtype else None, check_finite=True)
        max_batch, sizing = default_max_batch(model) if spec.max_batch is None else (spec.max_batch, "--max-batch")
        # the HTTP processes apply --max-queue (a request one cancelled may still sit in this queue)
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=UNBOUNDED, compile=spec.compile,
                        stream_interval=spec.stream_interval, detokenize=False)  # text: the HTTP processes
    except Exception as e:  # noqa: BLE001 - reported to the server as one line
        for _, events in channels:
            events.send(("error", str(e) or type(e).__name__))
        return
    # the requests in the engine, keyed both ways by (channel, id); edited by two threads, one key at a time
    ids: dict[Request, tuple[int, int]] = {}
    by_id: dict[tuple[int, int], Request] = {}

    def deliver(batch: list[tuple[Request, Event]]) -> None:  # the engine thread
        out: dict[int, list] = {}
        for request, event in batch:
            key = ids.pop(request, None) if event.finish_reason else ids.get(request)
            if key is not None:
                out.setdefault(key[0], []).append((key[1], event.ids, event.finish_reason, event.completion_tokens, event.error,
                                                    event.logprobs))
                if event.finish_reason:
                    by_id.pop(key, None)
        for c, events in out.items():
            outboxes[c].put(events)

    engine.deliver = deliver

    def send(c: int) -> None:  # one thread per channel: a slow HTTP process never holds up the others
        while (batch := outboxes[c].get()) is not None:
            try:
                channels[c][1].send(batch)
            except (BrokenPipeError, OSError):  # that HTTP process is gone; its requests are cancelled below
                pass
        channels[c][1].close()  # its reader sees the end at once

    senders = [threading.Thread(target=send, args=(c,), name=f"latentformer-engine-sender-{c}", daemon=True)
               for c in range(len(channels))]
    for t in senders:
        t.start()
    info = EngineInfo(model.config, model.num_params(), engine.cache.nbytes, engine.context, max_batch, sizing,
                      torch.get_num_threads())
    for c in range(len(channels)):
        outboxes[c].put(("ready", info))

    def serve_commands() -> None:  # a thread of its own: the engine loop keeps the thread that loaded the model
        open_commands = {commands: c for c, (commands, _) in enumerate(channels)}
        try:
            while open_commands:
                for commands in multiprocessing.connection.wait(list(open_commands)):
                    c = open_commands[commands]
                    try:
                        message = commands.recv()
                    except (EOFError, OSError):  # that HTTP process exited: cancel what it had in flight
                        del open_commands[commands]
                        for key in [k for k in list(by_id) if k[0] == c]:
                            if (request := by_id.pop(key, None)) is not None:
                                ids.pop(request, None)
                                request.cancel()
                        with in_flight.get_lock():
                            in_flight[c] = 0
                        outboxes[c].put(None)
                        continue
                    if message[0] == "submit":
                        _, rid, fields = message
                        request = Request(sink=None, **fields)
                        ids[request], by_id[(c, rid)] = (c, rid), request
                        try:
                            engine.submit(request)
                        except (ValueError, RuntimeError) as e:  # checked by the server already; never fatal here
                            deliver([(request, Event("", "error", 0, str(e)))])
                    elif message[0] == "cancel":
                        request = by_id.pop((c, message[1]), None)
                        if request is not None:
                            ids.pop(request, None)
                            request.cancel()  # the engine frees its row without an event
                    else:
                        return
        finally:
            engine.stop()

    threading.Thread(target=serve_commands, name="latentformer-engine-commands", daemon=True).start()
    started = time.perf_counter()
    engine.run()  # in the thread that loaded the model (see Engine: one OpenMP team on a CPU); tells the requests in flight
    print(f"latentformer engine: {engine.stats.summary(time.perf_counter() - started)}", file=sys.stderr, flush=True)
    for box in outboxes:
        box.put(None)
    for t in senders:
        t.join(5)


def _ready(channel: Channel) -> EngineInfo:
    """Wait for the engine's first message on `channel`: its info once loaded, or its one error
    line (ValueError); RuntimeError when the engine process exited without a word."""
    try:
        kind, payload = channel.events.recv()
    except (EOFError, OSError):
        raise RuntimeError("the engine process exited before it was ready") from None
    if kind == "error":
        raise ValueError(payload)
    return payload


class EngineClient:
    """`Engine`'s serving interface (`submit`, `cancel`, `deliver`, `start`, `stop`, `active`,
    `queued`, `max_batch`, `context`, `config`, `tokenizer`) over a `Channel` to the engine process.
    `stop` closes this client only; the owner (`EngineProcess`) stops the engine.

    `alive` turns False when the engine process is gone; if that was not by `stop`, `on_lost()`
    is called (from the reader thread) after the requests in flight have failed, and `submit`
    raises RuntimeError from then on."""

    def __init__(self, channel: Channel, tokenizer, info: EngineInfo, max_batch: int, max_queue: int) -> None:
        self.tokenizer, self.max_batch, self.max_queue = tokenizer, max_batch, max_queue
        self.info, self.config, self.context = info, info.config, info.context
        self.deliver: Callable[[list[tuple[Request, Event]]], None] = lambda batch: None
        self._channel = channel
        self._commands, self._events = channel.commands, channel.events
        self._requests: dict[int, Request] = {}  # in flight, by id
        self._rid: dict[Request, int] = {}
        self._texts: dict[int, RowText] = {}  # each request's text, from the ids the engine sends
        self._send = threading.Lock()  # the event loop and the reader both send commands
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="latentformer-engine-reader", daemon=True)
        self.alive, self._closing = True, False
        self.on_lost: Callable[[], None] = lambda: None

    @staticmethod
    def connect(channel: Channel, tokenizer, max_batch: int, max_queue: int) -> EngineClient:
        """A client for `channel` once the engine has loaded (see `_ready`)."""
        return EngineClient(channel, tokenizer, _ready(channel), max_batch, max_queue)

    def start(self) -> EngineClient:
        self._reader.start()
        return self

    def stop(self) -> None:
        self._closing = True
        self._commands.close()
        if self._reader.is_alive():
            self._reader.join(5)

    def _count(self, delta: int) -> None:
        """This process's slot of the shared in-flight count (call with self._lock held)."""
        with self._channel.in_flight.get_lock():
            self._channel.in_flight[self._channel.slot] += delta

    def _total(self) -> int:
        return sum(self._channel.in_flight[:])

    def submit(self, request: Request) -> None:
        """As `Engine.submit`: ValueError for a prompt that does not fit, QueueFull past the limit."""
        if not request.ids or len(request.ids) + request.max_tokens > self.context or request.max_tokens < 1:
            raise ValueError(f"a request needs 1 <= prompt tokens and prompt + max_tokens <= {self.context}, "
                             f"got {len(request.ids)} + {request.max_tokens}")
        with self._lock:
            if not self.alive:
                raise RuntimeError("the engine process has stopped")
            with self._channel.in_flight.get_lock():  # check and take a place as one step across processes
                total = self._total()
                if total >= self.max_batch + self.max_queue:
                    raise QueueFull(f"{total - self.max_batch} requests are waiting already (--max-queue {self.max_queue})")
                self._channel.in_flight[self._channel.slot] += 1
            rid = next(self._ids)
            self._requests[rid], self._rid[request] = request, rid
            self._texts[rid] = RowText(self.tokenizer, request.stops, incremental=request.stream)
        fields = {"ids": request.ids, "max_tokens": request.max_tokens, "temperature": request.temperature,
                  "top_p": request.top_p, "seed": request.seed, "stops": request.stops, "stream": request.stream,
                  "logprobs": request.logprobs}
        try:
            with self._send:
                self._commands.send(("submit", rid, fields))
        except (BrokenPipeError, OSError):  # the engine died a moment ago; the reader is about to notice
            with self._lock:
                if self._requests.pop(rid, None) is not None:
                    del self._rid[request], self._texts[rid]
                    self._count(-1)
            raise RuntimeError("the engine process has stopped") from None

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (a no-op once it has finished); no event follows."""
        request.cancel()
        with self._lock:
            rid = self._rid.pop(request, None)
            if rid is None:
                return
            del self._requests[rid], self._texts[rid]
            self._count(-1)
        self._cancel(rid)

    def _cancel(self, rid: int) -> None:
        try:
            with self._send:
                self._commands.send(("cancel", rid))
        except (BrokenPipeError, OSError):  # the engine is gone: nothing left to cancel
            pass

    @property
    def active(self) -> int:
        return min(self._total(), self.max_batch)

    @property
    def queued(self) -> int:
        return max(0, self._total() - self.max_batch)

    def _read(self) -> None:
        """Each message is one engine step's token ids: turn them into each request's text (here, in
        this HTTP process, not in the engine's thread), end a request at a stop string (and cancel it
        in the engine), and hand the step's events to `deliver` in one call."""
        while True:
            try:
                batch = self._events.recv()
            except (EOFError, OSError):
                break
            out, stopped = [], []
            with self._lock:
                for rid, ids, reason, count, error, logprobs in batch:
                    request = self._requests.get(rid)
                    if request is None:  # cancelled, or ended here at a stop string
                        continue
                    event = self._text_event(self._texts[rid], ids, reason, count, error, logprobs)
                    out.append((request, event))
                    if event.finish_reason:
                        del self._requests[rid], self._rid[request], self._texts[rid]
                        self._count(-1)
                        if reason is None:
                            stopped.append(rid)
            for rid in stopped:  # a stop string: the engine would go on to a stop id or max_tokens
                self._cancel(rid)
            if out:
                self.deliver(out)
        with self._lock:  # the engine process is gone: every request still waiting fails
            left, self._requests, self._rid, self._texts = list(self._requests.values()), {}, {}, {}
            self._count(-len(left))
            self.alive = False
        if left:
            self.deliver([(r, Event("", "error", 0, "the engine process stopped")) for r in left])
        if not self._closing:
            self.on_lost()


    @staticmethod
    def _text_event(text: RowText, ids: tuple[int, ...], reason: str | None, count: int, error: str | None,
                    logprobs: tuple) -> Event:
        """The Event an in-process engine would have sent for these ids (see `Engine._push`)."""
        piece = ""
        for k, token in enumerate(ids):
            piece += text.push(token)
            if text.done:  # a stop id (the engine's "stop") or a stop string, which ends the text (and the tokens) here
                return Event(piece, reason if token in text.stop_ids else "stop", count - (len(ids) - 1 - k), error,
                             logprobs=logprobs[:k + 1])
        if reason == "length":
            piece += text.finish()
        return Event(piece, reason, count, error, logprobs=logprobs)


class EngineProcess(EngineClient):
    """Starts the engine process and is the first HTTP process's client of it; `channels` are
    the other HTTP processes' (`processes` - 1 of them), to hand to `EngineClient.connect` there.
    `stop` stops the engine."""

    def __init__(self, spec: EngineSpec, tokenizer, processes: int = 1) -> None:
        if processes < 1:
            raise ValueError(f"the number of HTTP processes must be >= 1, got {processes}")
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        in_flight = ctx.Array("i", processes)
        ours, theirs = [], []
        for slot in range(processes):
            commands_out, commands_in = ctx.Pipe(duplex=False)
            events_out, events_in = ctx.Pipe(duplex=False)
            ours.append(Channel(commands_in, events_out, in_flight, slot))
            theirs.append((commands_out, events_in))
        self._proc = ctx.Process(target=_child, args=(spec, theirs, in_flight), name="latentformer-engine", daemon=True)
        self._proc.start()
        for commands_out, events_in in theirs:
            commands_out.close()
            events_in.close()
        try:
            info = _ready(ours[0])
        except RuntimeError:
            raise RuntimeError(f"the engine process exited with {self._proc.join(5) or self._proc.exitcode}") from None
        except ValueError:
            self._proc.join(5)
            raise
        super().__init__(ours[0], tokenizer, info, info.max_batch, spec.max_queue)
        self.channels = ours[1:]

    @property
    def exitcode(self) -> int | None:
        """The engine process's exit code (-N: killed by signal N); None while it runs."""
        return self._proc.exitcode

    def stop(self) -> None:
        self._closing = True
        try:
            self._commands.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        super().stop()
