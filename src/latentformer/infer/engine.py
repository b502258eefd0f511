"""Continuous batching: concurrent requests share one decode batch over one preallocated cache.

One engine thread owns a ragged KVCache of `max_batch` rows at the model's context: each row
holds one request at its own length (its tokens at slots 0..n-1, position = slot), so a request
joins and leaves without moving any other row (as vLLM's and SGLang's per-sequence positions; the
rows here are contiguous, not paged: a row is reserved at the full context).

- Waiting requests join after a prefill of their prompts (one left-padded batch of up to
  `prefill_tokens` tokens per engine step, in a cache sized to those prompts); each prompt's slots
  are copied into a free row (`KVCache.set_rows`), and its first token is sampled on the device.
- Every step, all active rows decode together, each writing its own next slot. A free row writes
  and attends only to its slot 0, and its token is discarded.
- A request leaves as soon as it finishes (a stop id, a stop string, max_tokens) or is cancelled
  (a client that went away); its row is free for the next step.
- Nothing waits for the device while the device works: the engine launches a prefill and step t+1
  before it reads back the tokens of step t (and of the prefill before it), so the host's work per
  token (detokenizing, stop strings, delivery) and the next prefill's launches overlap the device.
  The price: a row that finished at the step read back also ran in the step launched, whose token
  for it is discarded; a request that ends at its first token still runs one step.
- `stream_interval` (seconds) coalesces a streamed row's text: after its first piece, a row's
  text is handed out when it finishes or when that long has passed since its last delivery, so
  that the receiving side handles one event per row per interval instead of one per token. 0
  delivers every token's text.
- Sampling is per row (`sample_rows`): temperature and top_p per request, and a seeded request
  draws with its own torch.Generator, so the same seed gives the same text whatever else runs. A
  row whose distribution is not finite fails alone; the others go on.
- Logprobs (`Request.logprobs`, OpenAI's): for the rows that ask, and only them, the sampling
  step also takes the log_softmax of the model's raw logits at the chosen token and the top k
  (`token_logprobs`, on the device) and copies them back with the tokens, in the same readback;
  events carry them per token, beside the text or the ids.

With `compile=True` (CUDA) the decode step is a captured CUDA graph over the whole cache
(`GraphDecodeStep`); joins and leaves edit the cache and its per-row lengths in place, so the one
graph serves every step. Text and stop strings go through `RowText` (incremental detokenization,
as `generate`), so a request's text is what `generate` returns for it. `stats` counts where the
engine's time goes (steps, rows, prefill and host time), for benchmarks and monitoring.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from latentformer.infer.cuda_graph import decode_step
from latentformer.infer.detokenize import RowText
from latentformer.infer.prefill import prefill_attention
from latentformer.devices import to_device
from latentformer.infer.sampling import check_temperature, check_top_p, sample_rows, token_logprobs
from latentformer.model.transformer import Transformer


MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit)


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


@dataclass(frozen=True)
class Event:
    """What a request receives from the engine, in order: text increments, the last one with a
    finish_reason ("stop": a stop id or string, "length": max_tokens, "error": see `error`).
    From an engine that does not detokenize, `ids` are the tokens since the last event and `text`
    is "" (stop strings are then the receiver's to find; see `Engine`). For a request with
    `logprobs`, `logprobs` holds one (id, logprob, ((id, logprob), ...top k)) per token since the
    last event (the tokens counted in completion_tokens, a stop id included)."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    ids: tuple[int, ...] = ()
    logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()


@dataclass(eq=False)
class Request:
    """One completion: prompt ids (already within the context with max_tokens), sampling settings
    and `sink`, which receives the Events (called by the engine's `deliver`)."""

    ids: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    stream: bool = True  # False: the text comes in one piece at the end (no detokenizing per token)
    logprobs: int | None = None  # None: off; k: each token's logprob and the k most likely tokens' (see Event)
    cancelled: bool = False

    def __post_init__(self) -> None:
        check_temperature(self.temperature)  # ValueError: settings no distribution can follow
        check_top_p(self.top_p)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    def cancel(self) -> None:
        """Stop generating for this request (from any thread): its row is freed before the next step."""
        self.cancelled = True


@dataclass
class EngineStats:
    """Where the engine thread's time goes (seconds of host wall time, summed since start): `prefill`
    launching prefills (and sampling their first tokens), `launch` launching decode steps, `wait`
    blocked until the device has a step's tokens, `read` the host's work on those tokens (text,
    stop strings), `deliver` handing events out, `asleep` waiting for work with none in flight.
    `row_steps / steps` is the mean batch."""

    steps: int = 0
    row_steps: int = 0
    prefills: int = 0
    prefill_requests: int = 0
    prefill_tokens: int = 0
    prefill: float = 0.0
    launch: float = 0.0
    wait: float = 0.0
    read: float = 0.0
    deliver: float = 0.0
    asleep: float = 0.0

    def summary(self, wall: float) -> str:
        """One line: steps/s, mean active rows, and each part's share of the `wall` seconds the
        engine was awake (not asleep)."""
        wall -= self.asleep
        busy = {k: getattr(self, k) for k in ("prefill", "launch", "wait", "read", "deliver")}
        parts = ", ".join(f"{k} {100 * v / wall:.0f}%" for k, v in busy.items()) if wall > 0 else ""
        return (f"awake {wall:.1f} s, {self.steps / wall if wall > 0 else 0:.0f} steps/s, mean rows {self.row_steps / max(1, self.steps):.1f}, "
                f"{self.prefills} prefills ({self.prefill_requests} requests, {self.prefill_tokens} tokens); "
                f"time: {parts}, idle {100 * max(0.0, wall - sum(busy.values())) / wall if wall > 0 else 0:.0f}%")


@dataclass
class _Readback:
    """Tokens sampled on the device and not yet read: engine row `index[i]` held `rows[i]` when
    they were sampled (tokens for a row since freed or replaced are discarded). `host` is filled
    by a copy that does not block; `ready` says it has landed. `logprobs`: for the rows at these
    positions of `index` that asked, the host copies of `token_logprobs`' values and ids."""

    index: list[int]
    rows: list
    host: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: tuple[list[int], torch.Tensor, torch.Tensor] | None = None


@dataclass(eq=False)
class _Row:
    request: Request
    text: RowText | None  # None: the engine does not detokenize
    generator: torch.Generator | None
    length: int  # slots written in the cache row (mirrors cache.length[b]; no step reads it back)
    launched: int = 1  # tokens sampled on the device so far (the prefill's first, then one per step)
    count: int = 0  # tokens read back so far
    pending: str = ""  # text not yet delivered (stream_interval)
    ids: list[int] = field(default_factory=list)  # tokens not yet delivered (an engine that does not detokenize)
    logprobs: list[tuple] = field(default_factory=list)  # the undelivered tokens' logprobs (see Event)
    delivered: float | None = None  # time.monotonic() of the last delivery (None: nothing delivered yet)


def _deliver_now(batch: list[tuple[Request, Event]]) -> None:
    for request, event in batch:
        request.sink(event)


class Engine:
    """`submit(request)` from any thread; the engine thread batches and decodes.

    `deliver(batch)` is called by the engine thread once per step with that step's
    [(request, event)] (default: each request's sink, in the engine thread); a server passes
    a function that hands the batch to its event loop in one wake-up.

    `detokenize=False` moves text out of the engine thread (vLLM v1 detokenizes in another process
    too): events carry token ids, the engine ends a request only at a stop id or max_tokens, and
    the receiver turns ids into text with `RowText`, finds stop strings and cancels the request
    (`serve/worker.py` does this in each HTTP process). A request with stop strings, or streamed,
    gets its ids every step (subject to `stream_interval`), others all at once at the end.

    The engine thread is `start()`'s own thread, or the caller's with `run()`. On a CPU, prefer
    `run()` in the thread that loaded the model: each thread that runs torch ops has its own
    OpenMP team, and with two teams on the machine's cores OpenMP stops spinning between
    parallel regions, so every op waits for its workers to wake (a tiny-preset decode step took
    8.7 ms in a second thread against 2.1 ms in the first, 2-core CPU).
    """

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 16, max_queue: int = 256,
                 compile: bool = False, deliver: Callable[[list[tuple[Request, Event]]], None] | None = None,
                 prefill_tokens: int = 16384, stream_interval: float = 0.0, detokenize: bool = True) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if not (isinstance(stream_interval, (int, float)) and 0 <= stream_interval <= 10):
            raise ValueError(f"stream_interval must be a number of seconds in [0, 10], got {stream_interval!r}")
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        self.device = next(model.parameters()).device
        if compile and self.device.type != "cuda":
            raise ValueError("compile=True needs a model on a CUDA device")
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.stream_interval = float(stream_interval)
        self.detokenize, self.stop_ids = detokenize, tokenizer.stop_ids
        self.context = model.config.max_seq_len
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)  # never sample the model's padding ids
        self.deliver = deliver or _deliver_now
        self.cache = model.make_cache(max_batch, self.context)
        self.cache.ragged = True
        self.idle = torch.ones(max_batch, dtype=torch.bool, device=self.device)  # rows without a request
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.stats = EngineStats()
        self._inputs = torch.full((max_batch, 1), tokenizer.eot_id, dtype=torch.long, device=self.device)
        self._pinned = self.device.type == "cuda"
        self._inflight: list[_Readback] = []
        with torch.inference_mode():
            self._step = decode_step(model, self.cache, compile)
        self._thread = threading.Thread(target=self.run, name="latentformer-engine", daemon=True)

    # -- public, any thread ----------------------------------------------------------------
    def start(self) -> Engine:
        """Run the engine in a thread of its own (see `run`)."""
        self._thread.start()
        return self

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (any thread): its row is freed before the next step, no event follows."""
        request.cancel()

    def stop(self) -> None:
        """End the engine loop after its current step (waits for it when `start` began it)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull when `max_queue` requests wait already. The prompt must fit:
        1 <= len(ids) and len(ids) + max_tokens <= the model's context (ValueError)."""
        if not request.ids or len(request.ids) + request.max_tokens > self.context or request.max_tokens < 1:
            raise ValueError(f"a request needs 1 <= prompt tokens and prompt + max_tokens <= {self.context}, "
                             f"got {len(request.ids)} + {request.max_tokens}")
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if len(self.waiting) >= self.max_queue and not self._free_rows_for_queue():
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (--max-queue {self.max_queue})")
            self.waiting.append(request)
            self._wake.notify()

    @property
    def steps(self) -> int:
        """Decode steps run (for tests and monitoring)."""
        return self.stats.steps

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def _free_rows_for_queue(self) -> bool:
        """A request beyond the queue limit is still taken if a free row will pick it up at once."""
        return len(self.waiting) < self.rows.count(None)

    # -- the engine thread -----------------------------------------------------------------
    def run(self) -> None:
        """The engine loop in the calling thread, until `stop()` (from another thread); the
        requests still in flight then get an error event."""
        with torch.inference_mode():
            while True:
                with self._wake:
                    t = time.perf_counter()
                    while not self._stopping and not self.waiting and not any(self.rows) and not self._inflight:
                        self._wake.wait()
                    self.stats.asleep += time.perf_counter() - t
                    if self._stopping:
                        break
                events: list[tuple[Request, Event]] = []
                try:
                    self._drop_cancelled()
                    launched = self._admit(events)
                    if any(r is not None and r.launched < r.request.max_tokens for r in self.rows):
                        launched.append(self._launch())
                    for readback in self._inflight:
                        self._read(readback, events)
                    self._inflight = launched
                except Exception as e:  # e.g. out of memory: fail the requests in flight, keep serving
                    self._inflight = []
                    self._fail_all(events, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if events:
                    t = time.perf_counter()
                    self.deliver(events)
                    self.stats.deliver += time.perf_counter() - t
        with self._wake:  # stopping: tell the requests in flight and those still waiting
            left = [(r.request, r.count) for r in self.rows if r is not None] + [(q, 0) for q in self.waiting]
            self.waiting.clear()
        self.deliver([(request, Event("", "error", count, "the server is shutting down")) for request, count in left])

    def _drop_cancelled(self) -> None:
        for b, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._free(b)

    def _free(self, b: int) -> None:
        self.rows[b] = None
        self.idle[b] = True

    def _fail_all(self, events: list, message: str) -> None:
        for b, row in enumerate(self.rows):
            if row is not None:
                events.append((row.request, Event("", "error", row.count, message)))
                self._free(b)

    def _admit(self, events: list) -> list[_Readback]:
        """Take waiting requests (FIFO) into free rows: one prefill of at most `prefill_tokens`
        (padded) tokens per engine step, so that running rows keep decoding meanwhile."""
        free = [b for b, r in enumerate(self.rows) if r is None]
        group: list[Request] = []
        with self._wake:
            while self.waiting and len(group) < len(free):
                if self.waiting[0].cancelled:
                    self.waiting.popleft()
                    continue
                longest = max(len(r.ids) for r in [*group, self.waiting[0]])
                if group and longest * (len(group) + 1) > self.prefill_tokens:
                    break
                group.append(self.waiting.popleft())
        if not group:
            return []
        t = time.perf_counter()
        try:
            return [self._join(group, free)]
        except Exception as e:  # this prefill failed (e.g. out of memory): its requests fail, the others go on
            for b, row in enumerate(self.rows):
                if row is not None and row.request in group:
                    self._free(b)
            events.extend((r, Event("", "error", 0, f"{type(e).__name__}: {e}")) for r in group)
            return []
        finally:
            self.stats.prefill += time.perf_counter() - t

    def _join(self, group: list[Request], free: list[int]) -> _Readback:
        """Prefill `group` as one left-padded batch, sample each first token on the device, and
        copy each prompt's slots into a free row, whose first decode input is that token."""
        L = max(len(r.ids) for r in group)
        prefill = self.model.make_cache(len(group), L)
        prefill.set_left_padding([L - len(r.ids) for r in group])
        tokens = torch.full((len(group), L), self.tokenizer.eot_id, dtype=torch.long)
        for i, r in enumerate(group):
            tokens[i, L - len(r.ids):] = torch.tensor(r.ids)
        with prefill_attention():  # a new shape with nearly every group: no per-shape plan
            logits = self.model.next_token_logits(to_device(tokens, self.device), prefill)[:, :self.vocab]
        generators = [torch.Generator(self.device).manual_seed(r.seed) if r.seed is not None and r.temperature > 0 else None
                      for r in group]
        first = sample_rows(logits, [r.temperature for r in group], [r.top_p for r in group], generators)  # [G], -1: failed
        index = [free.pop(0) for _ in group]
        where = to_device(index, self.device)
        self.cache.set_rows(where, prefill, [len(r.ids) for r in group])
        rows = []
        for b, request, generator in zip(index, group, generators):
            text = RowText(self.tokenizer, request.stops, incremental=request.stream) if self.detokenize else None
            self.rows[b] = _Row(request, text, generator, length=len(request.ids))
            rows.append(self.rows[b])
        self.idle[where] = to_device([r.max_tokens == 1 for r in group], self.device)  # one token: no decode step
        self._inputs[where, 0] = first.clamp(min=0)  # a failed row's input must still be a valid id
        self.stats.prefills += 1
        self.stats.prefill_requests += len(group)
        self.stats.prefill_tokens += len(group) * L
        return self._readback(first, index, rows, logits, [r.logprobs for r in group])

    def _readback(self, tokens: torch.Tensor, index: list[int], rows: list, logits: torch.Tensor,
                  logprobs: list[int | None]) -> _Readback:
        """Start copying `tokens` to the host without waiting for them, with the logprobs of the
        rows that ask (logprobs[i] not None) from `logits`."""
        ask = [i for i, k in enumerate(logprobs) if k is not None]
        out = [tokens]
        if ask:
            out += token_logprobs(logits, tokens, ask, max(logprobs[i] for i in ask))
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pinned) for t in out]
        for h, t in zip(host, out):
            h.copy_(t, non_blocking=self._pinned)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return _Readback(index, rows, host[0], ready, (ask, host[1], host[2]) if ask else None)

    def _launch(self) -> _Readback:
        """One token for every row that may need one, from `_inputs` (each row's last token, on the
        device). A row whose max_tokens are all sampled already sits out like a free row (its last
        tokens are still to be read), so no row ever writes past prompt + max_tokens - 1 slots."""
        t = time.perf_counter()
        cache = self.cache
        rows = [r if r is not None and r.launched < r.request.max_tokens else None for r in self.rows]
        cache.length.masked_fill_(self.idle, 0)  # a row out of the step writes and reads its slot 0 only
        cache.pos = max(r.length for r in rows if r is not None)  # the slots attention reads, with the new one
        logits = self._step(self._inputs)[:, -1, :self.vocab]
        for b, r in enumerate(rows):
            if r is not None:
                r.length += 1
                r.launched += 1
                if r.launched == r.request.max_tokens:
                    self.idle[b] = True  # all its tokens are sampled: it sits out the next steps
        nxt = sample_rows(logits, [r.request.temperature if r else 0.0 for r in rows],
                          [r.request.top_p if r else 1.0 for r in rows], [r.generator if r else None for r in rows])
        self._inputs.copy_(nxt.clamp(min=0)[:, None])
        self.stats.steps += 1
        self.stats.row_steps += sum(r is not None for r in rows)
        readback = self._readback(nxt, list(range(len(rows))), rows, logits,
                                  [r.request.logprobs if r else None for r in rows])
        self.stats.launch += time.perf_counter() - t
        return readback

    def _read(self, readback: _Readback, events: list) -> None:
        t = time.perf_counter()
        if readback.ready is not None:
            readback.ready.synchronize()  # these tokens only, not the work launched after them
        now = time.perf_counter()
        self.stats.wait += now - t
        mono = time.monotonic()
        logprobs: dict[int, tuple] = {}
        if readback.logprobs is not None:
            ask, values, ids = readback.logprobs
            for i, v, t in zip(ask, values.tolist(), ids.tolist()):
                k = readback.rows[i].request.logprobs
                logprobs[i] = (v[0], tuple(zip(t[:k], v[1:k + 1])))
        for i, (b, row, token) in enumerate(zip(readback.index, readback.rows, readback.host.tolist())):
            if row is not None and row is self.rows[b] and self._push(row, token, logprobs.get(i), events, mono):
                self._free(b)
        self.stats.read += time.perf_counter() - now

    def _push(self, row: _Row, token: int, logprobs: tuple | None, events: list, now: float) -> bool:
        """Feed one sampled token (and its (logprob, top) when the request asks) to a row's text;
        queue its event when due (see `stream_interval`); True when the request is done."""
        if token < 0:  # its distribution was not finite (sample_rows): this request alone fails
            events.append((row.request, Event(row.pending, "error", row.count,
                                              "sampling failed: the token distribution was not finite for these "
                                              "sampling settings")))
            return True
        row.count += 1
        if logprobs is not None:
            row.logprobs.append((token, *logprobs))
        if row.text is None:
            return self._push_id(row, token, events, now)
        row.pending += row.text.push(token)
        reason = "stop" if row.text.done else "length" if row.count >= row.request.max_tokens else None
        if reason == "length":
            row.pending += row.text.finish()
        if reason or (row.pending and (row.delivered is None or now - row.delivered >= self.stream_interval)):
            events.append((row.request, Event(row.pending, reason, row.count, logprobs=tuple(row.logprobs))))
            row.pending, row.logprobs, row.delivered = "", [], now
        return reason is not None

    def _push_id(self, row: _Row, token: int, events: list, now: float) -> bool:
        """`_push` without text: the token joins the row's undelivered ids, shipped when due."""
        row.ids.append(token)
        reason = "stop" if token in self.stop_ids else "length" if row.count >= row.request.max_tokens else None
        request = row.request
        if reason or ((request.stream or request.stops) and (row.delivered is None or now - row.delivered >= self.stream_interval)):
            events.append((request, Event("", reason, row.count, ids=tuple(row.ids), logprobs=tuple(row.logprobs))))
            row.ids, row.logprobs, row.delivered = [], [], now
        return reason is not None
