"""The engine in its own process (what `latentformer serve` runs): each request's text equals
`generate` alone, cancelling frees the request, the queue limit holds, a load error is one line,
and a dead engine process fails the requests in flight instead of hanging them."""

from __future__ import annotations

import sys
import types

import pytest

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.infer.engine import QueueFull, Request
from latentformer.serve.worker import EngineProcess, EngineSpec
from tests.serve.test_engine import PROMPTS, Collector, tiny_model


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


def start(path, max_batch=4, max_queue=8, device="cpu", tok=None) -> EngineProcess:
    spec = EngineSpec(str(path), device, None, max_batch, max_queue, False, 0.0)
    engine = EngineProcess(spec, tok)
    engine.deliver = lambda batch: [request.sink(event) for request, event in batch]
    return engine.start()


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
    sink = Collector()
    engine.submit(Request(tok.encode("a"), 60, sink, temperature=0.0))
    engine._proc.kill()
    text, last = sink.wait()
    assert last.finish_reason == "error" and "engine process" in last.error
    engine.stop()
