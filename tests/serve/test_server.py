"""The OpenAI-compatible server, driven over loopback by the official `openai` client (and httpx
for raw malformed requests): completions and chat, streaming and not, stop strings, seeds,
usage, logprobs, auth, every 4xx, disconnects, the bounded queue, a 64-client load test, the CLI
and the README example."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.cli import main
from latentformer.cli.serve import listen
from latentformer.infer.chat import chat_stops, render_chat
from latentformer.infer.engine import Engine
from latentformer.serve.server import Server, create_app

from .test_engine import CONTEXT, PROMPTS, tiny_model, wait_until

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny"


@contextlib.contextmanager
def running(engine: Engine, limits: dict | None = None, **kw):
    """`Server` (uvicorn with the CLI's limits, `limits` overriding them) serving `engine` in a
    thread on a free loopback port; yields the base URL (the server is `running.server`)."""
    sock = listen("127.0.0.1", 0)
    server = running.server = Server(create_app(engine, NAME, **kw), **{"drain": 2.0, **(limits or {})})
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


_SERVERS: dict = {}


@pytest.fixture(scope="module")
def servers():
    """One server per attention kind (started on first use): (base_url, model, tokenizer, engine)."""
    stack = contextlib.ExitStack()

    def get(attention: str = "mla"):
        if attention not in _SERVERS:
            model, tok = tiny_model(attention)
            engine = Engine(model, tok, max_batch=8, max_queue=128)
            _SERVERS[attention] = (stack.enter_context(running(engine)), model, tok, engine)
        return _SERVERS[attention]

    yield get
    stack.close()
    _SERVERS.clear()


@pytest.fixture
def mla(servers):
    return servers("mla")


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def greedy(model, tok, prompt: str, n: int, **kw) -> str:
    return lf.generate(model, tok, prompt, max_new_tokens=n, temperature=0, **kw)


# -- behaviour ----------------------------------------------------------------------------------
def test_models_and_health(mla):
    url, model, tok, engine = mla
    models = client(url).models.list().data
    assert [m.id for m in models] == [NAME]
    info = httpx.get(url + "/v1/models").json()["data"][0]
    assert info["base_model"] is True and info["context_length"] == CONTEXT and info["attention"] == "mla"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_completion_greedy_usage_and_stream(mla):
    url, model, tok, _ = mla
    c = client(url)
    r = c.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0)
    expect = greedy(model, tok, "Hello there", 12)
    assert r.choices[0].text == expect
    assert r.usage.prompt_tokens == len(tok.encode("Hello there"))
    assert r.usage.completion_tokens == (12 if r.choices[0].finish_reason == "length" else r.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expect
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    ids = tok.encode("Hello there")  # a token-id prompt is the same prompt
    assert c.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0).choices[0].text == expect


def test_default_max_tokens_is_16_and_fits_the_context(mla):
    url, model, tok, _ = mla
    r = client(url).completions.create(model=NAME, prompt="x", temperature=0)
    assert r.usage.completion_tokens <= 16 and r.choices[0].text == greedy(model, tok, "x", 16)
    long = "y" * (CONTEXT - 3)  # 3 tokens of room: the default is cut to them
    r = client(url).completions.create(model=NAME, prompt=long, temperature=0)
    assert r.choices[0].text == greedy(model, tok, long, 3)


def test_stop_strings(mla):
    url, model, tok, _ = mla
    full = greedy(model, tok, "Stop here", 24)
    stop = next(full[i:i + 2] for i in range(3, 20) if "\ufffd" not in full[i:i + 2])
    c = client(url)
    r = c.completions.create(model=NAME, prompt="Stop here", max_tokens=24, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=NAME, prompt="Stop here", max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_chat_plain_transcript_stream_and_not(mla):
    url, model, tok, _ = mla
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expect = greedy(model, tok, render_chat(tok, messages), 20, stop=chat_stops(tok))
    c = client(url)
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expect
    assert r.usage.prompt_tokens == len(tok.encode(render_chat(tok, messages)))
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expect
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Hi!"}]
    assert c.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=20,
                                     temperature=0).choices[0].message.content == expect


def test_seed_gives_the_same_text(mla):
    url, model, tok, _ = mla
    c = client(url)
    kw = dict(model=NAME, prompt="Roll the dice", max_tokens=20, temperature=1.0, top_p=0.95)
    a = c.completions.create(seed=7, **kw).choices[0].text
    assert c.completions.create(seed=7, **kw).choices[0].text == a
    assert a == lf.generate(model, tok, "Roll the dice", max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    assert c.completions.create(seed=8, **kw).choices[0].text != a


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_greedy_equals_generate_amid_8_concurrent_requests(servers, attention):
    """The target prompt's greedy text through the server == generate alone, while 8 other
    requests of different lengths (streaming and not, sampled and greedy) run at the same time."""
    url, model, tok, engine = servers(attention)
    target = "The answer to the question is"

    async def go():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        async def other(i: int, prompt: str):
            kw = dict(model=NAME, prompt=prompt, max_tokens=8 + 2 * i, temperature=0.0 if i % 2 else 1.0)
            if i % 3 == 0:
                return "".join([ch.choices[0].text async for ch in await c.completions.create(stream=True, **kw)])
            return (await c.completions.create(**kw)).choices[0].text

        others = [asyncio.ensure_future(other(i, p)) for i, p in enumerate(PROMPTS[:8])]
        await asyncio.sleep(0.05)  # the target joins a running batch
        r = await c.completions.create(model=NAME, prompt=target, max_tokens=30, temperature=0)
        return r.choices[0].text, await asyncio.gather(*others)

    text, others = asyncio.run(go())
    assert text == greedy(model, tok, target, 30)
    for i, (prompt, got) in enumerate(zip(PROMPTS[:8], others)):
        if i % 2:  # the greedy ones are exact too
            assert got == greedy(model, tok, prompt, 8 + 2 * i)


def test_64_concurrent_streams_complete_with_bounded_memory(mla):
    url, model, tok, engine = mla
    buffers = [t.data_ptr() for layer in engine.cache.layers for t in layer]

    async def load() -> list[tuple[str, str | None, bool]]:
        limits = httpx.Limits(max_connections=100)
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               http_client=httpx.AsyncClient(limits=limits, timeout=120))

        async def one(i: int):
            stream = await c.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"client {i} " + "w" * (i % 9)}],
                max_tokens=6 + i % 11, temperature=0.8, seed=i, stream=True)
            pieces, reason = [], None
            async for ch in stream:
                pieces.append(ch.choices[0].delta.content or "")
                reason = ch.choices[0].finish_reason or reason
            return "".join(pieces), reason

        return await asyncio.gather(*(one(i) for i in range(64)))

    rss = []
    for _ in range(3):  # the first round warms allocators up; later rounds must not grow
        results = asyncio.run(load())
        assert all(reason in ("stop", "length") for _, reason in results)  # 0 errors, every stream complete
        rss.append(_rss_bytes())
    assert rss[2] - rss[1] < 32 * 2**20
    assert engine.active == 0 and engine.queued == 0
    assert [t.data_ptr() for layer in engine.cache.layers for t in layer] == buffers  # the cache is never reallocated


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- errors -------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


BAD_BODIES = [  # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"prompt": "a", "max_tokens": 1}\xff', 400, None),  # non-UTF-8
    ('{"prompt": "caf\u00e9"}'.encode("latin-1"), 400, None),
    (b'{"max_tokens": 5}', 400, "prompt"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": ["a", "b"]}', 400, "prompt"),
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": [1, 99999]}', 400, "prompt"),
    (b'{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 5.0}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": true}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": -3}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 1000000000}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 100000000000000000000000000000}', 400, "max_tokens"),
    (b'{"prompt": "a", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": 5}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "a", "top_p": 1e-300}', 400, "top_p"),  # 0 in float32: no token would survive the cut
    (b'{"prompt": "a", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "a", "stop": 3}', 400, "stop"),
    (b'{"prompt": "a", "stop": ""}', 400, "stop"),
    (b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "a", "seed": "1"}', 400, "seed"),
    (b'{"prompt": "a", "seed": 9223372036854775808}', 400, "seed"),
    (b'{"prompt": "a", "n": 0}', 400, "n"),
    (b'{"prompt": "a", "n": 129}', 400, "n"),
    (b'{"prompt": "a", "echo": 1}', 400, "echo"),
    (b'{"prompt": "a", "logprobs": 6}', 400, "logprobs"),
    (b'{"prompt": "a", "logprobs": -1}', 400, "logprobs"),
    (b'{"prompt": "a", "logprobs": true}', 400, "logprobs"),
    (b'{"prompt": "a", "logprobs": 2, "echo": true}', 400, "echo"),
    (b'{"prompt": "a", "frequency_penalty": 0.5}', 400, "frequency_penalty"),
    (b'{"prompt": "a", "model": "gpt-4"}', 404, "model"),
    (b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),  # nested too deep for json
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),  # over Python's int digit limit
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_completion_requests_are_4xx(mla, body, status, param):
    url = mla[0]
    _error(httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}), status, param)


def test_context_length_and_chat_errors(mla):
    url = mla[0]
    err = _error(httpx.post(url + "/v1/completions", json={"prompt": "x" * (CONTEXT + 5)}), 400, "prompt")
    assert err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
    err = _error(httpx.post(url + "/v1/completions", json={"prompt": "x" * 10, "max_tokens": CONTEXT - 5}), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"
    chat = url + "/v1/chat/completions"
    _error(httpx.post(chat, json={"messages": []}), 400, "messages")
    assert "role" in _error(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages")["message"]
    _error(httpx.post(chat, json={"messages": [{"role": "user"}]}), 400, "messages")
    _error(httpx.post(chat, json={"messages": "hello"}), 400, "messages")
    _error(httpx.post(chat, json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400, "messages")
    _error(httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}), 400, "tools")
    _error(httpx.post(chat, json={"prompt": "hi"}), 400, "messages")
    _error(httpx.get(url + "/v1/nothing"), 404)
    _error(httpx.get(url + "/v1/completions"), 405)
    with pytest.raises(openai.BadRequestError) as e:  # the openai client sees OpenAI's shape
        client(url).chat.completions.create(model=NAME, messages=[])
    assert e.value.body["param"] == "messages"


def test_oversized_bodies_are_413(mla):
    url = mla[0]
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    _error(httpx.post(url + "/v1/completions", content=big), 413)

    def chunks():  # no Content-Length: counted while read
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    _error(httpx.post(url + "/v1/completions", content=chunks()), 413)


def test_server_keeps_serving_after_errors(mla):
    url, model, tok, _ = mla
    for body, _, _ in BAD_BODIES[:6]:
        httpx.post(url + "/v1/completions", content=body)
    r = client(url).completions.create(model=NAME, prompt="still alive", max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy(model, tok, "still alive", 5)


# -- auth, queue, disconnects ---------------------------------------------------------------------
def slow_engine(max_batch: int, max_queue: int) -> Engine:
    """An engine of the tiny MLA model whose decode steps are slowed to 20 ms."""
    model, tok = tiny_model("mla")
    engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue)
    step = engine._step

    def slow_step(tokens):
        time.sleep(0.02)
        return step(tokens)

    engine._step = slow_step
    return engine


@pytest.fixture(scope="module")
def slow():
    """A server with one row, one queue place, an API key, and decode steps slowed to 20 ms."""
    engine = slow_engine(max_batch=1, max_queue=1)
    with running(engine, api_key="sekrit") as url:
        yield url, engine


def test_api_key(slow):
    url, _ = slow
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        assert _error(httpx.get(url + "/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
    _error(httpx.post(url + "/v1/completions", json={"prompt": "a"}), 401)
    _error(httpx.get(url + "/metrics"), 401)
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # liveness probes carry no key; it says nothing more
    with pytest.raises(openai.AuthenticationError):
        client(url, api_key="wrong").models.list()
    assert client(url, api_key="sekrit").completions.create(model=NAME, prompt="a", max_tokens=2).usage.prompt_tokens == 1


def test_queue_full_is_429_and_disconnect_frees_the_row(slow):
    url, engine = slow
    auth = {"Authorization": "Bearer sekrit"}
    body = {"prompt": "busy", "max_tokens": 40, "stream": True, "temperature": 0}  # greedy: no early end-of-text
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # it holds the only row
            assert engine.active == 1
            with http.stream("POST", "/v1/completions", json=body):  # it waits in the queue
                assert wait_until(lambda: engine.queued == 1)
                busy = httpx.post(url + "/v1/completions", json=body, headers=auth)
                assert _error(busy, 429)["type"] == "rate_limit_error" and busy.headers["Retry-After"] == "1"
                steps = engine.steps
            # the waiting client went away: its request never takes the row
        # the first client disconnects mid-stream: its row is free at once, long before 40 steps
        assert wait_until(lambda: engine.active == 0 and engine.queued == 0, timeout=0.5)
        assert engine.steps - steps < 30
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            http.post("/v1/completions", json={**body, "stream": False}, timeout=0.2)
        assert wait_until(lambda: engine.active == 0, timeout=0.5)
        r = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


# -- the CLI and the README -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, tok = tiny_model("mla")
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", model, tok)


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("latentformer serve: error:")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(ckpt), "--port", str(taken.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on 127.0.0.1:" in err
    assert main(["serve", str(ckpt), "--port", "0", "--stream-interval", "-5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stream-interval must be in [0, 10000] milliseconds" in err


def test_readme_example_runs_against_the_cli_server(ckpt):
    """`latentformer serve` as a process, and the README's client example as written (port adapted)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### serve"):]
    start = re.search(r"```bash\n(latentformer serve [^\n]*)", section).group(1)
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(example.strip().splitlines()) == 5 and "base_url=\"http://127.0.0.1:8000/v1\"" in example
    assert start.split()[:2] == ["latentformer", "serve"]
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "serve", str(ckpt), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "base model" in line, line + proc.stderr.read()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1)
        run = subprocess.run([sys.executable, "-c", example.replace(":8000/", f":{port}/")], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        model, tok = tiny_model("mla")
        messages = [{"role": "user", "content": "Hello"}]
        assert run.stdout == greedy(model, tok, render_chat(tok, messages), 32, stop=chat_stops(tok)) + "\n"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_with_three_http_processes(ckpt):
    """`serve --api-processes 3`: three processes accept on one port and feed one engine; greedy
    texts over many connections at once equal generate's, and the in-flight count they share is
    back to zero afterwards whichever process answers."""
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "serve", str(ckpt), "--port", "0", "--device", "cpu",
                             "--api-processes", "3", "--max-batch", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "3 HTTP processes" in line, line + proc.stderr.read()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1)
        url = f"http://127.0.0.1:{port}"
        model, tok = tiny_model("mla")

        async def go():
            c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

            async def one(i: int, prompt: str) -> str:
                kw = dict(model="tiny", prompt=prompt, max_tokens=4 + i % 6, temperature=0)
                if i % 2:
                    return "".join([ch.choices[0].text async for ch in await c.completions.create(stream=True, **kw)])
                return (await c.completions.create(**kw)).choices[0].text

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS * 3)))

        for i, (prompt, got) in enumerate(zip(PROMPTS * 3, asyncio.run(go()))):
            assert got == greedy(model, tok, prompt, 4 + i % 6), prompt
        c = client(url)  # logprobs from the engine process: a stream's chunks (some with text still held back) carry them all
        for kw in (dict(prompt="Hello there", logprobs=2), dict(messages=[{"role": "user", "content": "Hi!"}], logprobs=True)):
            create = c.completions.create if "prompt" in kw else c.chat.completions.create
            whole = create(model="tiny", max_tokens=12, temperature=0, **kw).choices[0]
            chunks = [ch.choices[0] for ch in create(model="tiny", max_tokens=12, temperature=0, stream=True, **kw) if ch.choices]
            if "prompt" in kw:
                assert "".join(ch.text for ch in chunks) == whole.text
                assert [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens] == whole.logprobs.tokens
                assert whole.logprobs.tokens and all(lp <= 0 for lp in whole.logprobs.token_logprobs)
            else:
                assert "".join(ch.delta.content or "" for ch in chunks) == whole.message.content
                assert [e.bytes for ch in chunks if ch.logprobs for e in ch.logprobs.content] == [
                    e.bytes for e in whole.logprobs.content]
        for _ in range(6):  # fresh connections: any of the processes may answer
            metrics = scrape(httpx.get(url + "/metrics", headers={"Connection": "close"}))
            assert metrics["latentformer_requests_running"] == 0 and metrics["latentformer_requests_waiting"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


def scrape(r: httpx.Response) -> dict[str, float]:
    """A /metrics reply as {sample name (with its labels): value}."""
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


# -- hostile and careless clients (issue 35) ------------------------------------------------------
def test_a_500_is_openai_shaped_and_keeps_the_connection(mla, monkeypatch, caplog):
    """An unexpected exception in a handler: a 500 in OpenAI's shape, its traceback logged once,
    and the keep-alive connection goes on serving (it used to be dropped after the reply)."""
    url, model, tok, _ = mla
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: 1 / 0 if text == "boom" else encode(text))
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)

    def post(prompt: str) -> tuple[int, dict]:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    with caplog.at_level(logging.INFO, "latentformer.serve"):
        status, body = post("boom")
        assert status == 500 and body["error"]["type"] == "server_error" and body["error"]["message"] == "internal error"
        sock = conn.sock
        for i in range(20):
            status, body = post(f"ok {i}")
            assert status == 200 and body["choices"][0]["text"] == greedy(model, tok, f"ok {i}", 2)
            assert conn.sock is sock  # the same connection
    conn.close()
    assert sum(r.exc_info is not None for r in caplog.records) == 1


def test_request_log_line_and_metrics(mla, caplog):
    """/metrics (Prometheus): running and waiting requests, tokens, TTFT and inter-token histograms;
    every request is one log line with its id, status, tokens, TTFT and duration."""
    url, model, tok, engine = mla
    before = scrape(httpx.get(url + "/metrics"))
    c = client(url)
    with caplog.at_level(logging.INFO, "latentformer.serve"):
        r = c.completions.create(model=NAME, prompt="metrics", max_tokens=7, temperature=0)
        chunks = list(c.completions.create(model=NAME, prompt="metrics!", max_tokens=9, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        _error(httpx.post(url + "/v1/completions", json={"prompt": 5}), 400)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "latentformer.serve"]
    assert len(lines) == 3, lines
    streamed = chunks[-1].usage.completion_tokens
    assert lines[0].startswith(f"{r.id} 200 POST /v1/completions prompt_tokens={len(tok.encode('metrics'))} "
                               f"completion_tokens={r.usage.completion_tokens} ttft=- duration=")
    assert re.fullmatch(rf"{chunks[0].id} 200 POST /v1/completions prompt_tokens=8 completion_tokens={streamed} "
                        r"ttft=0\.\d{3}s duration=\d+\.\d{3}s", lines[1]), lines[1]
    assert re.match(r"req-\w+ 400 POST /v1/completions prompt_tokens=0 completion_tokens=0", lines[2])
    after = scrape(httpx.get(url + "/metrics"))

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert grew("latentformer_generation_tokens_total") == r.usage.completion_tokens + streamed
    assert grew("latentformer_prompt_tokens_total") == 7 + 8
    assert grew("latentformer_requests_total{status=200}") == 2 and grew("latentformer_requests_total{status=400}") == 1
    assert grew("latentformer_time_to_first_token_seconds_count") == 1  # streams only
    assert 0 < grew("latentformer_inter_token_latency_seconds_count") <= streamed - 1
    assert grew("latentformer_request_duration_seconds_count") == 3
    assert after["latentformer_requests_running"] == 0 and after["latentformer_requests_waiting"] == 0
    assert after["latentformer_batch_rows"] == engine.max_batch and after["latentformer_cache_usage_ratio"] == 0


def test_n_choices_and_echo(mla):
    """n > 1: n requests in the engine, a given seed offset per choice; echo puts the prompt first."""
    url, model, tok, _ = mla
    c = client(url)
    kw = dict(model=NAME, prompt="Many ways", max_tokens=10, temperature=1.0, seed=11)
    r = c.completions.create(n=3, **kw)
    expect = [lf.generate(model, tok, "Many ways", max_new_tokens=10, temperature=1.0, seed=11 + i) for i in range(3)]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and [ch.text for ch in r.choices] == expect
    assert r.usage.completion_tokens == sum(len(tok.encode(t)) for t in expect) or r.usage.completion_tokens <= 30
    texts = ["", "", ""]
    for ch in c.completions.create(n=3, stream=True, **kw):
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == expect
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5,
                                     temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    e = c.completions.create(model=NAME, prompt="Echo me", max_tokens=5, temperature=0, echo=True)
    assert e.choices[0].text == "Echo me" + greedy(model, tok, "Echo me", 5)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=tok.encode("Echo me"),
                                                                         max_tokens=5, temperature=0, echo=True, stream=True))
    assert streamed == e.choices[0].text
    _error(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "echo": True}),
           400, "echo")


def model_greedy(model, tok, ids: list[int], n: int) -> list[tuple[int, torch.Tensor]]:
    """The greedy completion computed with the model alone (a full forward per token, fp32 CPU):
    each token and the log_softmax, over the tokenizer's ids, it was chosen from."""
    vocab = min(tok.vocab_size, model.config.vocab_size)
    out, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(n):
            lp = model(torch.tensor([seq]))[0, -1, :vocab].float().log_softmax(-1)
            out.append((int(lp.argmax()), lp))
            seq.append(out[-1][0])
            if seq[-1] in tok.stop_ids:
                break
    return out


def byte_token(t: int) -> str:
    """A token's text as OpenAI shows it, for the byte tokenizer: its byte, or "bytes:" and the byte
    escaped when it is not UTF-8 alone; end-of-text's text."""
    return "<|endoftext|>" if t == 256 else chr(t) if t < 128 else f"bytes:\\x{t:02x}"


def test_completion_logprobs_are_the_models_own_streamed_or_not(mla):
    """logprobs=3: per token counted in usage, its text, the model's own logprob (computed here
    directly), the true top 3 with the chosen token, and where it starts in the text; a stream's
    chunks carry the same, spread over them; the openai client parses both."""
    url, model, tok, _ = mla
    c = client(url)
    ids = tok.encode("Hello there")
    expect = model_greedy(model, tok, ids, 12)
    r = c.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0, logprobs=3)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == greedy(model, tok, "Hello there", 12)
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens == len(expect)
    for j, (t, dist) in enumerate(expect):
        assert lp.tokens[j] == byte_token(t) and abs(lp.token_logprobs[j] - dist[t].item()) < 1e-4
        top = dist.topk(3)
        want = {**{byte_token(u): v for u, v in zip(top.indices.tolist(), top.values.tolist())}, byte_token(t): dist[t].item()}
        assert list(lp.top_logprobs[j]) == list(want)
        assert all(abs(lp.top_logprobs[j][key] - v) < 1e-4 for key, v in want.items())
        done = bytes(t for t, _ in expect[:j])  # where the text of the tokens before j is whole, token j starts there
        if all(t < 256 for t, _ in expect[:j]) and _utf8(done):
            assert lp.text_offset[j] == len(done.decode())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in c.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0, logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            for key, values in streamed.items():
                values += getattr(ch.choices[0].logprobs, key)
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [list(d) for d in streamed["top_logprobs"]] == [list(d) for d in lp.top_logprobs]
    r0 = c.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0, logprobs=0)
    assert [list(d) for d in r0.choices[0].logprobs.top_logprobs] == [[t] for t in lp.tokens]  # the chosen token only


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_chat_logprobs_are_the_models_own_streamed_or_not(mla):
    """logprobs with top_logprobs=5: per token counted in usage, its text and exact bytes, the
    model's own logprob and the true top 5; streamed the same; n=2 greedy choices alike."""
    url, model, tok, _ = mla
    c = client(url)
    messages = [{"role": "user", "content": "Hi!"}]
    expect = model_greedy(model, tok, tok.encode(render_chat(tok, messages)), 16)
    kw = dict(model=NAME, messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=5)
    r = c.chat.completions.create(n=2, **kw)
    content = r.choices[0].logprobs.content
    assert 0 < len(content) == r.usage.completion_tokens // 2 and r.choices[1].logprobs.content == content
    for entry, (t, dist) in zip(content, expect):
        assert entry.token == byte_token(t) and abs(entry.logprob - dist[t].item()) < 1e-4
        assert entry.bytes == list(tok.byte_decoder()(t))
        top = dist.topk(5)
        assert [e.token for e in entry.top_logprobs] == [byte_token(u) for u in top.indices.tolist()]
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    # the tokens' bytes make the text (and, at a chat stop string, go on to its end)
    assert bytes(b for e in content for b in e.bytes).decode(errors="replace").startswith(r.choices[0].message.content)
    streamed = []
    for ch in c.chat.completions.create(stream=True, **kw):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * len(content)
    assert c.chat.completions.create(model=NAME, messages=messages, max_tokens=4).choices[0].logprobs is None
    chat = url + "/v1/chat/completions"
    for body, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"logprobs": 1}, "logprobs")):
        _error(httpx.post(chat, json={"messages": messages, **body}), 400, param)


@pytest.fixture(scope="module")
def guarded():
    """A server with a 0.5 s read timeout and room for 8 connections."""
    model, tok = tiny_model("mla")
    with running(Engine(model, tok, max_batch=2, max_queue=4), limits=dict(read_timeout=0.5, max_connections=8)) as url:
        yield url, int(url.rsplit(":", 1)[1])


def _raw(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_oversized_headers_are_431(guarded, caplog):
    url, port = guarded
    with caplog.at_level(logging.INFO, "latentformer.serve"):
        sock = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:  # a header that never ends: refused after about the limit, not buffered whole
            for _ in range(64):
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _reply(sock)
        assert reply.startswith(b"HTTP/1.1 431 ") and b'"error"' in reply
        sock.close()
        one = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")  # in one piece
        assert _reply(one).startswith(b"HTTP/1.1 431 ")
        one.close()
        assert httpx.get(url + "/health").status_code == 200
    assert [r.exc_info for r in caplog.records] == [None] * len(caplog.records)
    assert sum("431" in r.getMessage() for r in caplog.records) == 2


def test_slow_clients_are_cut_off_and_logged_once(guarded, caplog):
    """Slowloris: bodies declared and never sent, and headers never finished, are closed after the
    read timeout; each abandoned request is one log line, never a traceback."""
    url, port = guarded
    with caplog.at_level(logging.INFO, "latentformer.serve"):
        bodies = [_raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"prompt\"") for _ in range(3)]
        headers = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        silent = _raw(port)
        t = time.monotonic()
        for sock in bodies:
            assert _reply(sock) == b""  # closed: nobody waits for a reply to a request that never arrived
        assert _reply(headers).startswith(b"HTTP/1.1 408 ")
        assert _reply(silent) == b""
        assert time.monotonic() - t < 5
        for sock in [*bodies, headers, silent]:
            sock.close()
        assert wait_until(lambda: sum(" 499 " in r.getMessage() for r in caplog.records) == 3, timeout=5)
    assert all(r.exc_info is None for r in caplog.records)
    assert sum("408" in r.getMessage() for r in caplog.records) == 1


def test_connections_beyond_the_limit_get_503(guarded):
    """Idle connections past --max-connections: a request gets a 503 in OpenAI's shape, not a
    failure of the process; once they are cut, requests are served again. (And n beyond the
    requests the server holds is a 400.)"""
    url, port = guarded
    _error(httpx.post(url + "/v1/completions", json={"prompt": "a", "n": 7}), 400, "n")  # 2 rows + 4 queue places
    idle = [_raw(port) for _ in range(9)]
    try:
        time.sleep(0.05)
        r = httpx.get(url + "/health", headers={"Connection": "close"})
        assert _error(r, 503)["type"] == "server_error"
    finally:
        for sock in idle:
            sock.close()
    assert wait_until(lambda: httpx.get(url + "/health").status_code == 200, timeout=5)


def test_shutdown_drains_then_ends_requests_with_errors(caplog):
    """SIGTERM (uvicorn's should_exit) with requests in flight: those that end within --drain
    complete; then a non-streaming one gets a 503 in OpenAI's shape and a stream an error event
    and `data: [DONE]`; no CancelledError, no traceback."""
    engine = slow_engine(max_batch=4, max_queue=4)
    results: dict[str, object] = {}
    with caplog.at_level(logging.INFO, "latentformer.serve"):
        with running(engine, limits=dict(drain=0.3)) as url:
            server = running.server

            def plain(name: str, n: int) -> None:
                results[name] = httpx.post(url + "/v1/completions", json={"prompt": name, "max_tokens": n, "temperature": 0},
                                           timeout=30)

            def stream() -> None:
                with httpx.stream("POST", url + "/v1/completions", timeout=30,
                                  json={"prompt": "s", "max_tokens": 60, "temperature": 0, "stream": True}) as r:
                    results["stream"] = list(r.iter_lines())

            threads = [threading.Thread(target=plain, args=("short", 3)), threading.Thread(target=plain, args=("long", 60)),
                       threading.Thread(target=stream)]
            for th in threads:
                th.start()
            assert wait_until(lambda: engine.active == 3)
            server.should_exit = True
            for th in threads:
                th.join(30)
    assert results["short"].status_code == 200 and results["short"].json()["usage"]["completion_tokens"] == 3
    err = _error(results["long"], 503)
    assert "shutting down" in err["message"]
    events = [line for line in results["stream"] if line]
    assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][6:])["error"]["message"]
    assert all(r.exc_info is None and "CancelledError" not in r.getMessage() for r in caplog.records)


def test_api_key_from_the_environment_or_a_file(tmp_path, monkeypatch, capsys):
    from latentformer.cli import build_parser
    from latentformer.cli.serve import api_key

    def key(*argv: str):
        return api_key(build_parser().parse_args(["serve", "ckpt", *argv]))

    monkeypatch.delenv("LATENTFORMER_API_KEY", raising=False)
    assert key() is None
    monkeypatch.setenv("LATENTFORMER_API_KEY", "from-env")
    assert key() == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert key("--api-key-file", str(tmp_path / "key")) == "from-file"
    assert key("--api-key", "given") == "given"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        key("--api-key-file", str(tmp_path / "empty"))
    with pytest.raises(OSError, match="cannot read --api-key-file"):
        key("--api-key-file", str(tmp_path / "missing"))


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_stops_on_a_signal_cleanly(ckpt, sig):
    """SIGTERM or Ctrl-C: the server drains and ends through a normal exit with 128 + the signal's
    number, nothing on stderr but its request lines (no traceback, no leaked-semaphore warning from
    multiprocessing's resource tracker, which a process that dies by the signal leaves behind)."""
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "serve", str(ckpt), "--port", "0", "--device", "cpu",
                             "--drain", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = "http://127.0.0.1:" + re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1)
        assert client(url).completions.create(model="tiny", prompt="a", max_tokens=2).choices
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
        err = proc.stderr.read()
        assert "Traceback" not in err and "leaked" not in err and "Warning" not in err, err
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_cli_dead_engine_stops_the_server(ckpt):
    """`latentformer serve` with its key in the environment: the key is on no process's command
    line, /health needs none, the rest does; the batch is sized for the CPU and the startup line
    says why. kill -9 of the engine process: the server exits 1 with one line (for a supervisor
    to restart it) instead of living on and failing every request."""
    env = {**os.environ, "LATENTFORMER_API_KEY": "s3cret-key"}
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "serve", str(ckpt), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "batch 4 (the CPU default; --max-batch to change)" in line, line + proc.stderr.read()
        url = "http://127.0.0.1:" + re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1)
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert httpx.get(url + "/v1/models").status_code == 401
        assert client(url, api_key="s3cret-key").completions.create(model="tiny", prompt="a", max_tokens=2).choices
        pids = [proc.pid, *_children(proc.pid)]
        assert not any(b"s3cret-key" in Path(f"/proc/{p}/cmdline").read_bytes() for p in pids)
        engine = next(p for p in pids[1:] if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(engine, signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        err = proc.stderr.read()
        assert "Traceback" not in err
        assert [x for x in err.splitlines() if "error" in x] == [
            "latentformer serve: error: the engine process stopped (killed by signal 9); the server stops too"]
    finally:
        proc.kill()
        proc.wait(timeout=30)
