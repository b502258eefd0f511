"""Continuous batching: concurrent requests share one decode batch over one preallocated cache.

One engine thread owns a KVCache of `max_batch` rows at the model's context. The rows share one
write position `pos`; row b's left padding `pad[b]` says where its own tokens start (its token in
slot s has position s - pad[b]; padding is never attended: the attention mask and the fused MLA
decode kernel both honour per-row padding).

- Waiting requests join after a prefill of their prompts (one left-padded batch of up to
  `prefill_tokens` tokens per engine step, in a cache sized to those prompts); each prompt's slots
  are copied into a free row so that its last token sits at slot pos - 1 (pad[b] = pos - P).
  If pos < P, every row first moves right (`KVCache.shift`).
- Every step, all active rows decode together, each writing slot pos. A free row attends only to
  its own slot (pad = pos) and its token is discarded, so a row costs its own length, not the
  longest prompt's.
- A request leaves as soon as it finishes (a stop id, a stop string, max_tokens) or is cancelled
  (a client that went away); its row is free for the next step. When pos reaches the context,
  the rows move left to the longest active row (one copy of the cache, rare); when the batch
  empties, pos starts again at the next prompt's length.
- The engine launches step t+1 before it reads step t's tokens back, so the host's work per token
  (detokenizing, stop strings, delivery) overlaps the device's next step; the price is that a
  finished row runs one extra step whose token is discarded.
- `stream_interval` (seconds) coalesces a streamed row's text: after its first piece, a row's
  text is handed out when it finishes or when that long has passed since its last delivery, so
  that the receiving side (an HTTP server's event loop, sharing this process's GIL) handles one
  event per row per interval instead of one per token. 0 delivers every token's text.
- Sampling is per row (`sample_rows`): temperature and top_p per request, and a seeded request
  draws with its own torch.Generator, so the same seed gives the same text whatever else runs.

With `compile=True` (CUDA) the decode step is a captured CUDA graph over the whole cache
(`GraphDecodeStep`); joins, leaves and shifts edit the cache and `pad` in place, so the one
graph serves every step. Text and stop strings go through `RowText` (incremental
detokenization, as `generate`), so a request's text is what `generate` returns for it.
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
from latentformer.infer.sampling import sample_rows
from latentformer.model.transformer import Transformer


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


@dataclass(frozen=True)
class Event:
    """What a request receives from the engine, in order: text increments, the last one with a
    finish_reason ("stop": a stop id or string, "length": max_tokens, "error": see `error`)."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


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
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (from any thread): its row is freed before the next step."""
        self.cancelled = True


@dataclass
class _Step:
    """A decode step launched on the device and not yet read back: the rows it ran for, its
    sampled tokens (copied to the host without blocking) and the event that says they are there."""

    rows: list
    host: torch.Tensor
    ready: torch.cuda.Event | None


@dataclass(eq=False)
class _Row:
    request: Request
    text: RowText
    generator: torch.Generator | None
    start: int = 0  # the row's first slot (= pad[b]), mirrored here so that no step reads `pad` back
    count: int = 0  # tokens sampled so far
    pending: str = ""  # text not yet delivered (stream_interval)
    delivered: float | None = None  # time.monotonic() of the last delivery (None: nothing delivered yet)


def _deliver_now(batch: list[tuple[Request, Event]]) -> None:
    for request, event in batch:
        request.sink(event)


class Engine:
    """`submit(request)` from any thread; the engine thread batches and decodes.

    `deliver(batch)` is called by the engine thread once per step with that step's
    [(request, event)] (default: each request's sink, in the engine thread); a server passes
    a function that hands the batch to its event loop in one wake-up.

    The engine thread is `start()`'s own thread, or the caller's with `run()`. On a CPU, prefer
    `run()` in the thread that loaded the model: each thread that runs torch ops has its own
    OpenMP team, and with two teams on the machine's cores OpenMP stops spinning between
    parallel regions, so every op waits for its workers to wake (a tiny-preset decode step took
    8.7 ms in a second thread against 2.1 ms in the first, 2-core CPU).
    """

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 16, max_queue: int = 256,
                 compile: bool = False, deliver: Callable[[list[tuple[Request, Event]]], None] | None = None,
                 prefill_tokens: int = 16384, stream_interval: float = 0.0) -> None:
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
        self.context = model.config.max_seq_len
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)  # never sample the model's padding ids
        self.deliver = deliver or _deliver_now
        self.cache = model.make_cache(max_batch, self.context)
        self.pad = self.cache.use_row_padding()
        self.idle = torch.ones(max_batch, dtype=torch.bool, device=self.device)  # rows without a request
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and monitoring)
        self._inputs = torch.full((max_batch, 1), tokenizer.eot_id, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self._host = [torch.empty(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._inflight: _Step | None = None
        self.shifts = 0
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
                    while not self._stopping and not self.waiting and not any(self.rows) and self._inflight is None:
                        self._wake.wait()
                    if self._stopping:
                        break
                events: list[tuple[Request, Event]] = []
                try:
                    self._drop_cancelled()
                    self._admit(events)
                    self._decode(events)
                except Exception as e:  # e.g. out of memory: fail the requests in flight, keep serving
                    self._inflight = None
                    self._fail_all(events, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                if events:
                    self.deliver(events)
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
        if not any(self.rows):
            self.cache.pos = 0  # the batch is empty: the next prompt starts a new timeline
            self.cache.length.zero_()

    def _fail_all(self, events: list, message: str) -> None:
        for b, row in enumerate(self.rows):
            if row is not None:
                events.append((row.request, Event("", "error", row.count, message)))
                self._free(b)

    def _admit(self, events: list) -> None:
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
            return
        try:
            self._join(group, free, events)
        except Exception as e:  # this prefill failed (e.g. out of memory): its requests fail, the others go on
            events.extend((r, Event("", "error", 0, f"{type(e).__name__}: {e}")) for r in group)

    def _join(self, group: list[Request], free: list[int], events: list) -> None:
        """Prefill `group` as one left-padded batch, sample each first token, and copy the
        prompts that go on into free rows at the shared position."""
        L = max(len(r.ids) for r in group)
        prefill = self.model.make_cache(len(group), L)
        prefill.set_left_padding([L - len(r.ids) for r in group])
        tokens = torch.full((len(group), L), self.tokenizer.eot_id, dtype=torch.long)
        for i, r in enumerate(group):
            tokens[i, L - len(r.ids):] = torch.tensor(r.ids)
        with prefill_attention():  # a new shape with nearly every group: no per-shape plan
            logits = self.model.next_token_logits(tokens.to(self.device), prefill)[:, :self.vocab]
        generators = [torch.Generator(self.device).manual_seed(r.seed) if r.seed is not None and r.temperature > 0 else None
                      for r in group]
        first = sample_rows(logits, [r.temperature for r in group], [r.top_p for r in group], generators).tolist()
        for i, (request, generator, token) in enumerate(zip(group, generators, first)):
            row = _Row(request, RowText(self.tokenizer, request.stops, incremental=request.stream), generator)
            if self._push(row, token, events, time.monotonic()):
                continue  # finished on its first token: never enters the batch
            P = len(request.ids)
            if not any(self.rows):
                self.cache.pos = P
                self.cache.length.fill_(P)
            elif self.cache.pos < P:
                self._shift(P)
            b = free.pop(0)
            self.cache.insert(b, prefill, i, P)
            row.start = self.cache.pos - P
            self._inputs[b, 0] = token
            self.rows[b] = row
            self.idle[b] = False

    def _shift(self, new_pos: int) -> None:
        """Move every row so that the last written slot is new_pos - 1 (see KVCache.shift)."""
        span = self.cache.pos - min(r.start for r in self.rows if r is not None)
        delta = new_pos - self.cache.pos
        self.cache.shift(new_pos, span)
        for r in self.rows:
            if r is not None:
                r.start += delta
        self.shifts += 1

    def _push(self, row: _Row, token: int, events: list, now: float) -> bool:
        """Feed one sampled token to a row's text; queue its event when due (see `stream_interval`);
        True when the request is done."""
        row.count += 1
        row.pending += row.text.push(token)
        reason = "stop" if row.text.done else "length" if row.count >= row.request.max_tokens else None
        if reason == "length":
            row.pending += row.text.finish()
        if reason or (row.pending and (row.delivered is None or now - row.delivered >= self.stream_interval)):
            events.append((row.request, Event(row.pending, reason, row.count)))
            row.pending, row.delivered = "", now
        return reason is not None

    def _decode(self, events: list) -> None:
        """Launch the next step, then read back the one before it: the host's work on a step's
        tokens (text, stop strings, delivery) overlaps the device's next step. A row that ended at
        the step read back was also in the launched one; that extra token is discarded."""
        launched = self._launch() if any(self.rows) else None
        if self._inflight is not None:
            self._read(self._inflight, events)
        self._inflight = launched

    def _launch(self) -> _Step:
        """One token for every active row, from `_inputs` (each row's last token, on the device)."""
        cache = self.cache
        if cache.pos >= self.context:  # move every row left, to the longest one
            self._shift(cache.pos - min(r.start for r in self.rows if r is not None))
        self.pad.masked_fill_(self.idle, cache.pos)  # a free row attends only to the slot it writes
        logits = self._step(self._inputs)[:, -1, :self.vocab]
        self.steps += 1
        rows = list(self.rows)
        nxt = sample_rows(logits, [r.request.temperature if r else 0.0 for r in rows],
                          [r.request.top_p if r else 1.0 for r in rows], [r.generator if r else None for r in rows])
        self._inputs.copy_(nxt[:, None])
        host = self._host[self.steps % 2]  # two buffers: the step being read back keeps its own
        host.copy_(nxt, non_blocking=host.is_pinned())
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return _Step(rows, host, ready)

    def _read(self, step: _Step, events: list) -> None:
        if step.ready is not None:
            step.ready.synchronize()  # this step's tokens only, not the one launched after it
        now = time.monotonic()
        for b, token in enumerate(step.host.tolist()):
            row = step.rows[b]
            if row is not None and row is self.rows[b] and self._push(row, token, events, now):
                self._free(b)
