"""The engine in its own process (what `latentformer serve` runs): each request's text equals
`generate` alone, cancelling frees the request, the queue limit holds (also across the clients of
several HTTP processes), a load error is one line, a dead engine process fails the requests in
flight instead of hanging them, and a client that goes away loses only its own requests."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
import types

import httpx
import pytest

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.infer.engine import Engine, QueueFull, Request
from latentformer.serve.worker import EngineClient, EngineProcess, EngineSpec
from tests.serve.test_engine import PROMPTS, Collector, check_logprobs, tiny_model, wait_until


@pytest.fixture(autouse=True)
def plain_main(monkeypatch):
    """A spawned process imports the parent's __main__ first. In this pytest process an earlier
    Streamlit AppTest (tests/serve/test_ui.py) leaves the playground script registered as __main__,
    which would run again in the engine process; `latentformer serve`'s own __main__ is import-safe."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, tok = tiny_model("mla")
    return save_checkpoint(tmp_path_factory.mktemp("worker") / "tiny", model, tok), model, tok


def deliver_to_sinks(engine):
    engine.deliver = lambda batch: [request.sink(event) for request, event in batch]
    return engine.start()


def start(path, max_batch=4, max_queue=8, device="cpu", tok=None, processes=1) -> EngineProcess:
    spec = EngineSpec(str(path), device, None, max_batch, max_queue, False, 0.0)
    return deliver_to_sinks(EngineProcess(spec, tok, processes=processes))


def test_texts_equal_generate_alone(ckpt):
    path, model, tok = ckpt
    engine = start(path, tok=tok)
    try:
        assert engine.context == model.config.max_seq_len and engine.config == model.config
        assert engine.info.params == model.num_params()
        jobs = []
        for prompt, n in zip(PROMPTS, [30, 9, 20, 40, 12, 25]):
            sink = Collector()
            engine.submit(Request(tok.encode(prompt), n, sink, temperature=0.0))
            jobs.append((prompt, n, sink))
        for prompt, n, sink in jobs:
            text, last = sink.wait()
            assert text == lf.generate(model, tok, prompt, max_new_tokens=n, temperature=0), prompt
            assert last.finish_reason in ("length", "stop") and last.completion_tokens <= n
        assert engine.active == 0 and engine.queued == 0
    finally:
        engine.stop()


def test_text_and_stop_strings_are_the_http_process_work(ckpt):
    """The engine process sends token ids; the client turns them into text, ends a request at a
    stop string and cancels it in the engine. Streamed or whole, with or without a stop string,
    text, finish_reason and completion_tokens are what the in-process engine (which detokenizes
    itself) gives."""
    path, model, tok = ckpt
    cases = []
    for prompt in PROMPTS[:4]:
        full = lf.generate(model, tok, prompt, max_new_tokens=24, temperature=0)
        for stream in (True, False):
            cases += [(prompt, [], stream), (prompt, [full[6:9]] if len(full) >= 9 else [], stream)]
    results = {}
    for name, engine in (("process", start(path, tok=tok, max_queue=32)), ("in-process", Engine(model, tok, max_batch=4).start())):
        try:
            jobs = []
            for prompt, stops, stream in cases:
                sink = Collector()
                engine.submit(Request(tok.encode(prompt), 24, sink, temperature=0.0, stops=stops, stream=stream))
                jobs.append(sink)
            results[name] = [(text, last.finish_reason, last.completion_tokens) for text, last in (j.wait() for j in jobs)]
            assert wait_until(lambda: engine.active == 0)  # the rows ended at a stop string are free
        finally:
            engine.stop()
    assert results["process"] == results["in-process"]
    assert any(reason == "stop" and tokens < 24 for _, reason, tokens in results["process"])
    for (prompt, stops, _), (text, _, _) in zip(cases, results["process"]):
        assert text == lf.generate(model, tok, prompt, max_new_tokens=24, temperature=0, stop=stops or None)


def test_logprobs_cross_the_pipe_and_end_with_the_text(ckpt):
    """Logprobs through the engine process: the model's own (check_logprobs), and cut where the
    client ends the text at a stop string, so that they match the in-process engine's token for
    token and number completion_tokens."""
    path, model, tok = ckpt
    full = lf.generate(model, tok, PROMPTS[0], max_new_tokens=24, temperature=0)
    cases = [([], True), ([full[6:9]], True), ([full[6:9]], False), ([], False)]
    results = {}
    # stream_interval 10 s: the engine process sends the tokens after the first in one event at the
    # end, past the stop string, which the client finds and cuts there with the logprobs
    coalesced = deliver_to_sinks(EngineProcess(EngineSpec(str(path), "cpu", None, 4, 8, False, 10.0), tok))
    for name, engine in (("process", coalesced), ("in-process", Engine(model, tok, max_batch=4).start())):
        try:
            jobs = []
            for stops, stream in cases:
                sink = Collector()
                engine.submit(Request(tok.encode(PROMPTS[0]), 24, sink, temperature=0.0, stops=stops, stream=stream, logprobs=2))
                jobs.append(sink)
            results[name] = [(text, last, sink.logprobs) for sink in jobs for text, last in [sink.wait()]]
        finally:
            engine.stop()
    for (text, last, logprobs), (text2, last2, logprobs2) in zip(results["process"], results["in-process"]):
        assert (text, last.finish_reason, last.completion_tokens) == (text2, last2.finish_reason, last2.completion_tokens)
        assert len(logprobs) == last.completion_tokens and [t for t, _, _ in logprobs] == [t for t, _, _ in logprobs2]
        check_logprobs(model, tok, tok.encode(PROMPTS[0]), logprobs, 2)
    assert results["process"][1][1].completion_tokens < results["process"][0][1].completion_tokens  # cut at the stop string


def test_a_cpu_engine_leaves_the_http_processes_a_core(ckpt, monkeypatch):
    """On a CPU the engine's intra-op threads are the cores less one per HTTP process (at least
    one), unless OMP_NUM_THREADS says; a GPU engine keeps torch's default."""
    import os

    from latentformer.serve.worker import engine_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert engine_threads("cpu", 1) == max(1, cores - 1) and engine_threads("cpu", 64) == 1
    assert engine_threads("cuda", 1) is None
    path, _, tok = ckpt
    engine = start(path, tok=tok)
    try:
        assert engine.info.threads == max(1, cores - 1)
    finally:
        engine.stop()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert engine_threads("cpu", 1) is None


def test_http_processes_default_to_one_on_a_cpu_and_one_per_four_cores_on_a_gpu(monkeypatch):
    """serve's --api-processes default: the CPU's cores are the model's; a GPU engine gets one HTTP
    process per 4 cores, from 1 to 4."""
    import os

    from latentformer.serve.worker import default_http_processes

    for cores, expected in [(2, 1), (8, 2), (16, 4), (128, 4)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_http_processes("cpu") == 1
        assert default_http_processes("cuda:0") == expected


def test_cancel_and_queue_limit(ckpt):
    path, model, tok = ckpt
    engine = start(path, max_batch=1, max_queue=1, tok=tok)
    try:
        long = Request(tok.encode("a"), 60, Collector(), temperature=0.0)
        waiting = Request(tok.encode("b"), 5, Collector(), temperature=0.0)
        engine.submit(long)
        engine.submit(waiting)
        with pytest.raises(QueueFull):
            engine.submit(Request(tok.encode("c"), 5, Collector()))
        with pytest.raises(ValueError, match="prompt"):
            engine.submit(Request(tok.encode("x" * engine.context), 1, Collector()))
        engine.cancel(long)  # frees its place at once: the waiting one runs, a new one is taken
        assert engine.active + engine.queued == 1
        sink = Collector()
        engine.submit(Request(tok.encode("d"), 5, sink, temperature=0.0))
        assert waiting.sink.wait()[0] == lf.generate(model, tok, "b", max_new_tokens=5, temperature=0)
        assert sink.wait()[0] == lf.generate(model, tok, "d", max_new_tokens=5, temperature=0)
    finally:
        engine.stop()


def test_load_error_is_one_line(ckpt):
    path, _, tok = ckpt
    with pytest.raises(ValueError) as e:
        start(path, device="cuda:7", tok=tok)
    assert "\n" not in str(e.value) and "cuda" in str(e.value)


def test_a_dead_engine_process_fails_the_requests_in_flight(ckpt):
    path, _, tok = ckpt
    engine = start(path, tok=tok)
    lost = threading.Event()
    engine.on_lost = lost.set
    sink = Collector()
    engine.submit(Request(tok.encode("a"), 60, sink, temperature=0.0))
    engine._proc.kill()
    text, last = sink.wait()
    assert last.finish_reason == "error" and "engine process" in last.error
    assert lost.wait(10) and not engine.alive
    with pytest.raises(RuntimeError, match="engine process has stopped"):
        engine.submit(Request(tok.encode("b"), 5, Collector()))
    engine.stop()


def test_an_orderly_stop_is_not_a_lost_engine(ckpt):
    path, _, tok = ckpt
    engine = start(path, tok=tok)
    lost = threading.Event()
    engine.on_lost = lost.set
    engine.stop()
    assert not lost.wait(0.5) and engine.exitcode == 0


def test_http_after_the_engine_process_died(ckpt):
    """The server over an engine process that was killed: /health is 503 and a request is a 503 in
    OpenAI's shape (it was 200 "ok" and a 500 BrokenPipeError with a traceback)."""
    from tests.serve.test_server import _error, running

    path, _, tok = ckpt
    engine = EngineProcess(EngineSpec(str(path), "cpu", None, 2, 4, False, 0.0), tok)
    with running(engine) as url:
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        engine._proc.kill()
        assert wait_until(lambda: httpx.get(url + "/health").status_code == 503)
        assert httpx.get(url + "/health").json() == {"status": "engine stopped"}
        err = _error(httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}), 503)
        assert "engine" in err["message"] and err["type"] == "server_error"


def _client_process(channel, path, ready) -> None:
    """Another HTTP process's client: submits one long request, says so, then waits to be killed
    (its reader never runs, so only the engine can free its slot)."""
    from latentformer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    client = EngineClient.connect(channel, tok, 1, 1)
    client.submit(Request(tok.encode("a"), 60, None, temperature=0.0))
    ready.set()
    time.sleep(600)


def test_two_clients_share_one_engine_and_its_queue_limit(ckpt):
    """Two HTTP processes' clients of one engine: the limit counts both (a third request is 429
    here while the other process holds a place), and when that process dies the engine frees its
    place and its request while this one keeps working (texts as generate's)."""
    path, model, tok = ckpt
    engine = start(path, max_batch=1, max_queue=1, tok=tok, processes=2)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_client_process, args=(engine.channels[0], str(path), ready), daemon=True)
    proc.start()
    engine.channels[0].close()
    try:
        assert ready.wait(60)
        waiting = Request(tok.encode("b"), 5, Collector(), temperature=0.0)
        engine.submit(waiting)
        with pytest.raises(QueueFull):
            engine.submit(Request(tok.encode("c"), 5, Collector()))
        assert waiting.sink.wait()[0] == lf.generate(model, tok, "b", max_new_tokens=5, temperature=0)
        assert engine.active + engine.queued == 1  # the other process's request is still counted
        proc.kill()
        assert wait_until(lambda: engine.active + engine.queued == 0, timeout=30)
        sink = Collector()
        engine.submit(Request(tok.encode("d"), 7, sink, temperature=0.0))
        assert sink.wait()[0] == lf.generate(model, tok, "d", max_new_tokens=7, temperature=0)
    finally:
        proc.kill()
        engine.stop()


def test_a_client_that_stops_leaves_at_once_and_the_engine_serves_on(ckpt):
    """An HTTP process's graceful shutdown: its client's stop returns without waiting for the
    engine (which closes that channel's events), and the other client keeps being served."""
    path, model, tok = ckpt
    engine = start(path, tok=tok, processes=2)
    other = deliver_to_sinks(EngineClient.connect(engine.channels[0], tok, engine.max_batch, engine.max_queue))
    try:
        t = time.monotonic()
        other.stop()
        assert time.monotonic() - t < 3 and not other._reader.is_alive()
        sink = Collector()
        engine.submit(Request(tok.encode("e"), 6, sink, temperature=0.0))
        assert sink.wait()[0] == lf.generate(model, tok, "e", max_new_tokens=6, temperature=0)
    finally:
        engine.stop()
