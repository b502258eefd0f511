"""The continuous-batching engine: every request's text equals `generate` on that prompt alone
(greedy; and seeded sampling), whatever joins and leaves meanwhile, rows at different lengths
up to the context; cancelled requests free their rows; the queue is bounded; per-row sampling;
a request whose sampling fails fails alone."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

import latentformer as lf
from latentformer.data.tokenizer import load_tokenizer
from latentformer.infer.engine import Engine, QueueFull, Request
from latentformer.infer.sampling import SamplingParams, sample, sample_rows

CONTEXT = 64
ATTENTION = {
    "mla": dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "gqa": dict(attention="gqa", n_kv_heads=2),
}
# prompts of different lengths (bytes = tokens); together with their max_tokens they exercise
# joins into a running batch and rows that reach the end of the context while others are short
PROMPTS = ["The quick brown fox", "a", "Hello, world! How are you today?", "abc", "0123456789" * 4,
           "zz top", "Once upon a time there was", "x y z", "A much longer prompt that fills half the context"]


def tiny_model(attention: str = "mla") -> tuple[lf.Transformer, object]:
    torch.manual_seed(0)
    # init_std 0.2: peaked logits, so a wrong position or a leak between rows changes the tokens
    cfg = lf.ModelConfig(vocab_size=260, n_layers=2, d_model=32, n_heads=4, max_seq_len=CONTEXT, d_ff=48, init_std=0.2,
                         **ATTENTION[attention])
    return lf.Transformer(cfg).eval(), load_tokenizer("byte")


@pytest.fixture(scope="module", params=list(ATTENTION))
def model(request):
    return tiny_model(request.param)


class Collector:
    """A request's sink: gathers its events; `wait()` returns (text, last event)."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.pieces: list[str] = []  # every event's text, in order (filled by wait)
        self.logprobs: list[tuple] = []  # every event's logprobs, in order (filled by wait)

    def __call__(self, event) -> None:
        self.events.put(event)

    def wait(self, timeout: float = 60.0):
        while True:
            event = self.events.get(timeout=timeout)
            self.pieces.append(event.text)
            self.logprobs.extend(event.logprobs)
            if event.finish_reason:
                return "".join(self.pieces), event


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def make_request(tok, prompt: str, max_tokens: int, **kw) -> tuple[Request, Collector]:
    sink = Collector()
    return Request(tok.encode(prompt), max_tokens, sink, **kw), sink


@pytest.fixture
def engine(model):
    m, tok = model
    eng = Engine(m, tok, max_batch=4, max_queue=32).start()
    yield eng
    eng.stop()


def test_batched_greedy_equals_generate_alone(model, engine):
    """9 requests of different lengths through 4 rows, arriving while others decode: each text is
    exactly generate(temperature=0) of its prompt alone (fp32 CPU: identical tokens)."""
    m, tok = model
    max_tokens = [40, 12, 25, 50, 16, 7, 30, 45, 14]
    groups, join = [], engine._join
    engine._join = lambda group, *a: (groups.append((len(group), engine.active)), join(group, *a))[1]
    jobs = []
    for i, (prompt, n) in enumerate(zip(PROMPTS, max_tokens)):
        jobs.append(make_request(tok, prompt, n, temperature=0.0))
        engine.submit(jobs[-1][0])
        if i in (2, 5):  # let the batch run so that later requests join it mid-decode
            while engine.steps < 3 * i:
                time.sleep(0.005)
    for (req, sink), prompt, n in zip(jobs, PROMPTS, max_tokens):
        text, last = sink.wait()
        assert text == lf.generate(m, tok, prompt, max_new_tokens=n, temperature=0), prompt
        # "stop": the model sampled end-of-text (counted) before max_tokens
        assert (last.finish_reason, last.completion_tokens) == ("length", n) or (
            last.finish_reason == "stop" and last.completion_tokens < n)
    assert max(n for n, _ in groups) > 1  # the test went through a left-padded prefill of several prompts
    assert max(active for _, active in groups) > 0  # and through joins into a running batch
    assert engine.active == 0


def test_stop_strings_and_first_token_finish(model, engine):
    m, tok = model
    full = lf.generate(m, tok, "Hello", max_new_tokens=20, temperature=0)
    stop = full[5:8]
    req, sink = make_request(tok, "Hello", 20, temperature=0.0, stops=[stop])
    engine.submit(req)
    text, last = sink.wait()
    assert text == full[:full.find(stop)] and last.finish_reason == "stop"
    steps = engine.steps
    req, sink = make_request(tok, "Hello", 1, temperature=0.0)  # done at its prefill: never runs a decode step
    engine.submit(req)
    assert sink.wait()[0] == lf.generate(m, tok, "Hello", max_new_tokens=1, temperature=0)
    assert engine.steps == steps


def test_rows_at_the_end_of_the_context_beside_running_rows(model, engine):
    """A prompt of context - 1 tokens with max_tokens 1, and one of context - 3 with 3, join rows
    that are decoding: nothing is written past the context and every text equals generate alone."""
    m, tok = model
    prompts = [("a" * (CONTEXT - 1), 1), ("b" * (CONTEXT - 3), 3), ("The quick brown fox", 30), ("x y z", 25)]
    jobs = [make_request(tok, prompt, n, temperature=0.0) for prompt, n in prompts]
    for (req, _), i in zip(jobs[2:], range(2)):
        engine.submit(req)
    assert wait_until(lambda: engine.steps >= 3)
    for req, _ in jobs[:2]:
        engine.submit(req)
    for (_, sink), (prompt, n) in zip(jobs, prompts):
        assert sink.wait()[0] == lf.generate(m, tok, prompt, max_new_tokens=n, temperature=0), prompt[:10]


def test_a_request_whose_sampling_fails_fails_alone(model, engine):
    """A poisoned request (top_p below float32's range, which the Request refuses and is forced
    here, so the engine's own isolation is what is tested) among 12 normal ones: it gets an error,
    the 12 complete with the text each has alone, and the engine goes on serving."""
    m, tok = model
    with pytest.raises(ValueError, match="top_p"):
        Request(tok.encode("x"), 4, Collector(), temperature=1.0, top_p=1e-300)
    poisoned, bad = make_request(tok, "poison", 10, temperature=1.0)
    poisoned.top_p = 1e-300  # set after the Request's check; 0 in float32: no token survives the cut
    prompts = [PROMPTS[i % 8] for i in range(12)]  # the first eight: each fits with up to 21 new tokens
    normal = [make_request(tok, prompt, 10 + i, temperature=0.0) for i, prompt in enumerate(prompts)]
    for i, (req, _) in enumerate(normal):
        engine.submit(req)
        if i == 5:
            engine.submit(poisoned)
    text, last = bad.wait()
    assert last.finish_reason == "error" and "sampling" in last.error
    for i, (_, sink) in enumerate(normal):
        text, last = sink.wait()
        assert last.finish_reason != "error"
        assert text == lf.generate(m, tok, prompts[i], max_new_tokens=10 + i, temperature=0)


def test_seeded_sampling_is_independent_of_the_batch(model, engine):
    """The same seed gives the same text alone and amid other (unseeded) requests, and the text
    of generate(seed=...) on that prompt alone."""
    m, tok = model
    kw = dict(temperature=0.9, top_p=0.9, seed=1234)
    alone, sink = make_request(tok, "Seeded prompt", 30, **kw)
    engine.submit(alone)
    first = sink.wait()[0]
    noise = [make_request(tok, p, 20 + i, temperature=1.0) for i, p in enumerate(PROMPTS[:5])]
    for req, _ in noise[:3]:
        engine.submit(req)
    again, sink2 = make_request(tok, "Seeded prompt", 30, **kw)
    engine.submit(again)
    for req, _ in noise[3:]:
        engine.submit(req)
    assert sink2.wait()[0] == first
    assert first == lf.generate(m, tok, "Seeded prompt", max_new_tokens=30, temperature=0.9, top_p=0.9, seed=1234)
    other, sink3 = make_request(tok, "Seeded prompt", 30, **{**kw, "seed": 99})
    engine.submit(other)
    assert sink3.wait()[0] != first
    for _, s in noise:
        s.wait()


def test_cancel_frees_the_row_at_once(model, engine):
    m, tok = model
    req, sink = make_request(tok, "Cancel me", CONTEXT - 10, temperature=1.0)
    engine.submit(req)
    sink.events.get(timeout=30)  # it is decoding
    req.cancel()
    assert wait_until(lambda: engine.active == 0)
    steps = engine.steps
    time.sleep(0.05)
    assert engine.steps == steps  # nothing left to decode
    assert bool(engine.idle.all())  # every row out of the step


def test_stream_interval_coalesces_pieces_without_changing_the_text(model):
    """With a stream interval, a streamed request gets its first piece at once, then fewer, larger
    pieces (a step delivers a row's text only once the interval has passed); the text is unchanged."""
    m, tok = model
    texts, counts = {}, {}
    for interval in (0.0, 10.0):
        eng = Engine(m, tok, max_batch=4, max_queue=8, stream_interval=interval).start()
        try:
            jobs = [make_request(tok, p, 30, temperature=0.0) for p in PROMPTS[:4]]
            for req, _ in jobs:
                eng.submit(req)
            results = [sink.wait() for _, sink in jobs]
            texts[interval] = [text for text, _ in results]
            counts[interval] = [len(sink.pieces) for _, sink in jobs]
        finally:
            eng.stop()
    assert texts[10.0] == texts[0.0]
    # a 10 s interval: the first piece, then everything else with the finish
    assert all(n <= 2 for n in counts[10.0]) and sum(counts[0.0]) > sum(counts[10.0])
    with pytest.raises(ValueError, match="stream_interval"):
        Engine(m, tok, stream_interval=-1)


def test_queue_is_bounded(model):
    m, tok = model
    eng = Engine(m, tok, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        eng.submit(make_request(tok, "q", 4)[0])
    with pytest.raises(QueueFull):
        eng.submit(make_request(tok, "q", 4)[0])
    with pytest.raises(ValueError, match="prompt"):
        eng.submit(Request(tok.encode("x" * CONTEXT), 1, Collector()))
    with pytest.raises(ValueError, match="CUDA"):
        Engine(m, tok, compile=True)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, tok, max_batch=0)


def test_engine_errors_fail_requests_and_keep_serving(model, monkeypatch):
    m, tok = model
    eng = Engine(m, tok, max_batch=2).start()
    try:
        real, calls = eng._step, []

        def flaky(tokens):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated device failure")
            return real(tokens)

        eng._step = flaky
        req, sink = make_request(tok, "abc", 10, temperature=0.0)
        eng.submit(req)
        text, last = sink.wait()
        assert last.finish_reason == "error" and "simulated device failure" in last.error
        req, sink = make_request(tok, "abc", 10, temperature=0.0)
        eng.submit(req)
        assert sink.wait()[0] == lf.generate(m, tok, "abc", max_new_tokens=10, temperature=0)
    finally:
        eng.stop()


def check_logprobs(m, tok, prompt_ids: list[int], logprobs: list[tuple], k: int) -> None:
    """The engine's logprobs of a completion == the model's own, computed directly: log_softmax of
    one full forward over prompt + completion (fp32 CPU), over the tokenizer's ids, at each token,
    and the true top k."""
    ids = [t for t, _, _ in logprobs]
    vocab = min(tok.vocab_size, m.config.vocab_size)
    with torch.no_grad():
        lp = m(torch.tensor([prompt_ids + ids[:-1]]))[0, len(prompt_ids) - 1:, :vocab].float().log_softmax(-1)
    for j, (token, logprob, top) in enumerate(logprobs):
        assert abs(logprob - lp[j, token].item()) < 1e-4
        expect = lp[j].topk(k)
        assert [t for t, _ in top] == expect.indices.tolist()
        assert all(abs(v - e) < 1e-4 for (_, v), e in zip(top, expect.values.tolist()))


def test_logprobs_are_the_models_own_and_cost_the_other_rows_nothing(model, engine):
    """Rows with logprobs (greedy, and sampled: the raw distribution, before temperature and top_p)
    beside rows without: each row's text is the same as alone, and the logprobs, one per token
    counted in completion_tokens, are the model's own (see check_logprobs)."""
    m, tok = model
    stop = next(ch for ch in lf.generate(m, tok, PROMPTS[6], max_new_tokens=16, temperature=0)[2:] if ch != "\ufffd")
    cases = [(PROMPTS[0], 20, dict(temperature=0.0, logprobs=3)), (PROMPTS[2], 14, dict(temperature=0.0)),
             (PROMPTS[3], 25, dict(temperature=0.0, logprobs=0)), (PROMPTS[5], 18, dict(temperature=0.7, top_p=0.9, seed=3, logprobs=5)),
             (PROMPTS[6], 16, dict(temperature=0.0, logprobs=20, stops=[stop]))]
    jobs = [make_request(tok, prompt, n, **kw) for prompt, n, kw in cases]
    for req, _ in jobs:
        engine.submit(req)
    for (req, sink), (prompt, n, kw) in zip(jobs, cases):
        text, last = sink.wait()
        settings = {k: v for k, v in kw.items() if k in ("temperature", "top_p", "seed")}
        assert text == lf.generate(m, tok, prompt, max_new_tokens=n, stop=kw.get("stops"), **settings), prompt
        if "logprobs" not in kw:
            assert sink.logprobs == []
            continue
        assert len(sink.logprobs) == last.completion_tokens > 0
        if "stops" in kw:  # ended at the stop string, its last token's logprobs the last
            assert last.finish_reason == "stop" and last.completion_tokens < n
        check_logprobs(m, tok, req.ids, sink.logprobs, kw["logprobs"])
    with pytest.raises(ValueError, match="logprobs"):
        Request([1], 1, print, logprobs=21)


def test_sample_rows_matches_sample_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    temps, top_ps, seeds = [0.0, 0.7, 1.3, 0.7], [1.0, 0.8, 1.0, 0.5], [None, 5, 6, 7]
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    out = sample_rows(logits, temps, top_ps, gens)
    assert out[0] == logits[0].argmax()
    for b in range(1, 4):
        alone = sample(logits[b:b + 1], SamplingParams(temps[b], top_p=top_ps[b]), generator=torch.Generator().manual_seed(seeds[b]))
        assert out[b] == alone[0]
    # top_p 0.5 keeps only the most likely tokens of row 3
    keep = torch.softmax(logits[3] / 0.7, -1).sort(descending=True)
    allowed = keep.indices[:int((keep.values.cumsum(0) - keep.values < 0.5).sum())]
    draws = {int(sample_rows(logits, temps, top_ps, [None] * 4)[3]) for _ in range(50)}
    assert draws <= set(allowed.tolist())


def test_engine_thread_stops_cleanly(model):
    m, tok = model
    eng = Engine(m, tok, max_batch=2).start()
    req, sink = make_request(tok, "long", CONTEXT - 8, temperature=1.0)
    eng.submit(req)
    sink.events.get(timeout=30)
    stopper = threading.Thread(target=eng.stop)
    stopper.start()
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert sink.wait()[1].finish_reason in ("error", "length")


def test_run_in_the_callers_thread(model):
    """`run()` is the engine loop in the calling thread (the engine process runs it in the thread
    that loaded the model): requests submitted from another thread are served, greedy text equals
    generate alone, and `stop()` from that thread ends `run()` with the request in flight told."""
    m, tok = model
    eng = Engine(m, tok, max_batch=2)
    done, (long, long_sink) = make_request(tok, "abc", 12, temperature=0.0), make_request(tok, "long", CONTEXT - 8)
    outcome = {}

    def client() -> None:
        eng.submit(done[0])
        outcome["text"] = done[1].wait()[0]
        eng.submit(long)
        long_sink.events.get(timeout=30)
        eng.stop()

    feeder = threading.Thread(target=client)
    feeder.start()
    eng.run()
    feeder.join(timeout=30)
    assert outcome["text"] == lf.generate(m, tok, "abc", max_new_tokens=12, temperature=0)
    assert long_sink.wait()[1].finish_reason in ("error", "length")
    with pytest.raises(RuntimeError, match="stopped"):
        eng.submit(make_request(tok, "late", 4)[0])
