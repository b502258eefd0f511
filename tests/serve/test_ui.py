"""The Streamlit playground driven headless by streamlit.testing (AppTest) and the `ui` verb's checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.cli import main
from latentformer.cli.ui import streamlit_command, streamlit_env
from latentformer.data.tokenizer import load_tokenizer
from latentformer.infer.chat import chat_stops, render_chat

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(lf.__file__).parent / "serve" / "ui_app.py"


def tiny_checkpoint(path: Path, max_seq_len: int = 64) -> Path:
    """A random 2-layer MLA model with the byte tokenizer (fast on CPU; its text is noise)."""
    torch.manual_seed(0)
    cfg = lf.ModelConfig(vocab_size=260, n_layers=2, d_model=32, n_heads=4, max_seq_len=max_seq_len, d_ff=48,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, init_std=0.2)
    return save_checkpoint(path, lf.Transformer(cfg).eval(), load_tokenizer("byte"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("ui") / "model")
    model, tok = lf.load(path, device="cpu")
    return path, model, tok


def app(monkeypatch, *argv: str) -> AppTest:
    monkeypatch.setattr(sys, "argv", [str(APP), *argv])  # what `streamlit run APP -- ARGS` gives the script
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    return at


@pytest.fixture
def page(ckpt, monkeypatch):
    at = app(monkeypatch, str(ckpt[0]), "--device", "cpu")
    assert not at.exception and not at.error
    return at


def generated(at: AppTest) -> str:
    return at.session_state.completion["text"]


def test_greedy_prompt_equals_generate_and_survives_reruns(page, ckpt):
    _, model, tok = ckpt
    page.text_area(key="prompt").set_value("Hello")
    page.slider(key="temperature").set_value(0.0)
    page.number_input(key="max_new_tokens").set_value(12)
    page.button(key="generate").click().run()
    expect = lf.generate(model, tok, "Hello", max_new_tokens=12, temperature=0)
    assert not page.exception and not page.error
    assert generated(page) == expect and [t.value for t in page.text] == ["Hello" + expect]
    assert page.session_state.completion["stopped"] is False and page.session_state.job is None
    page.slider(key="top_p").set_value(0.5).run()  # any rerun keeps the response
    assert [t.value for t in page.text] == ["Hello" + expect]


def test_sampling_controls_reach_generate(page, ckpt):
    _, model, tok = ckpt
    page.text_area(key="prompt").set_value("abc")
    page.slider(key="temperature").set_value(1.3)
    page.number_input(key="top_k").set_value(40)
    page.slider(key="top_p").set_value(0.9)
    page.slider(key="min_p").set_value(0.02)
    page.slider(key="repetition_penalty").set_value(1.2)
    page.number_input(key="max_new_tokens").set_value(10)
    page.number_input(key="seed").set_value(7)
    page.button(key="generate").click().run()
    expect = lf.generate(model, tok, "abc", max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.9, min_p=0.02,
                         repetition_penalty=1.2, seed=7)
    assert generated(page) == expect
    assert expect != lf.generate(model, tok, "abc", max_new_tokens=10, temperature=1.3, seed=7)  # the flags mattered


def interrupt_after(monkeypatch, n: int) -> None:
    """Make the next stream end its run after `n` pieces, as a click does: Streamlit stops the
    script at its next page update (st.stop raises the same kind of script-control exception)."""
    import streamlit as st

    import latentformer.infer.generate as gen

    real = gen.generate

    def generate(*args, **kwargs):
        pieces = real(*args, **kwargs)

        def interrupted():
            for i, piece in enumerate(pieces):
                if i == n:
                    st.stop()
                yield piece
        return interrupted()

    monkeypatch.setattr(gen, "generate", generate)


def start_greedy(page, prompt: str, max_new_tokens: int = 40) -> None:
    page.text_area(key="prompt").set_value(prompt)
    page.slider(key="temperature").set_value(0.0)
    page.number_input(key="max_new_tokens").set_value(max_new_tokens)
    page.button(key="generate").click().run()


def test_stop_keeps_the_text_so_far(page, ckpt, monkeypatch):
    _, model, tok = ckpt
    pieces = list(lf.generate(model, tok, "Hello", max_new_tokens=40, temperature=0, stream=True))
    interrupt_after(monkeypatch, 5)
    start_greedy(page, "Hello")
    assert page.session_state.job["status"] == "running"  # the page as a click finds it mid-stream
    assert page.button(key="generate").disabled and not page.button(key="stop").disabled
    page.button(key="stop").click().run()
    kept = "".join(pieces[:5])
    assert page.session_state.job is None and not page.exception
    assert page.session_state.completion == {"prompt": "Hello", "text": kept, "stopped": True}
    assert [t.value for t in page.text] == ["Hello" + kept] and len(kept) < len("".join(pieces))
    assert any(c.value == f"stopped after {len(kept)} generated characters" for c in page.caption)
    assert page.button(key="stop").disabled and not page.button(key="generate").disabled


def test_another_click_during_a_stream_also_stops_it(page, ckpt, monkeypatch):
    _, model, tok = ckpt
    pieces = list(lf.generate(model, tok, "Hey", max_new_tokens=40, temperature=0, stream=True))
    interrupt_after(monkeypatch, 3)
    start_greedy(page, "Hey")
    page.slider(key="top_p").set_value(0.3).run()
    assert page.session_state.completion == {"prompt": "Hey", "text": "".join(pieces[:3]), "stopped": True}
    assert page.session_state.job is None


def test_prompt_too_long_is_an_error_element(page):
    page.text_area(key="prompt").set_value("x" * 80)  # byte tokens: 80 > the 64-token context
    page.number_input(key="max_new_tokens").set_value(8)
    page.button(key="generate").click().run()
    assert not page.exception
    assert len(page.error) == 1 and "exceeds max_seq_len=64" in page.error[0].value
    assert page.session_state.job is None and page.session_state.completion is None


def test_chat_renders_messages_and_stops_at_the_turn(page, ckpt):
    _, model, tok = ckpt
    page.radio(key="mode").set_value("Chat").run()
    page.slider(key="temperature").set_value(0.0)
    page.number_input(key="max_new_tokens").set_value(8)
    page.text_area(key="message").set_value("hi there")
    page.button(key="generate").click().run()
    first = [{"role": "user", "content": "hi there"}]
    reply = lf.generate(model, tok, render_chat(tok, first), max_new_tokens=8, temperature=0, stop=chat_stops(tok),
                        truncate=True).strip()
    assert not page.exception and not page.error
    assert [(m["role"], m["content"]) for m in page.session_state.messages] == [("user", "hi there"), ("assistant", reply)]
    assert [c.name for c in page.chat_message] == ["user", "assistant"]
    assert page.text_area(key="message").value == ""  # the input is cleared for the next turn
    page.text_area(key="message").set_value("more")
    page.button(key="generate").click().run()
    convo = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    second = lf.generate(model, tok, render_chat(tok, convo), max_new_tokens=8, temperature=0, stop=chat_stops(tok),
                         truncate=True).strip()
    assert page.session_state.messages[-1]["content"] == second and len(page.chat_message) == 4
    page.button(key="clear").click().run()
    assert page.session_state.messages == [] and len(page.chat_message) == 0


def test_empty_chat_message_is_an_error(page):
    page.radio(key="mode").set_value("Chat").run()
    page.button(key="generate").click().run()
    assert [e.value for e in page.error] == ["type a message first"] and page.session_state.job is None


def test_clear_in_prompt_mode(page):
    page.text_area(key="prompt").set_value("Hi")
    page.number_input(key="max_new_tokens").set_value(3)
    page.button(key="generate").click().run()
    assert page.session_state.completion is not None and len(page.text) == 1
    page.button(key="clear").click().run()
    assert page.session_state.completion is None and len(page.text) == 0


def test_model_card_in_the_side_panel(page, ckpt):
    _, model, _ = ckpt
    per_token = model.kv_cache_bytes_per_token(torch.bfloat16)  # (16 + 8) x 2 layers x 2 bytes = 96
    mha_per_token = 2 * 2 * 32 * 2  # 2 (K, V) x 2 layers x d_model x 2 bytes
    md = " ".join(m.value for m in page.sidebar.markdown)
    assert "MLA (kv_lora_rank 16, rope 8, 4 heads)" in md and "context 64 tokens" in md
    assert f"| parameters | {model.num_params():,} |" in md
    assert f"| KV cache bytes/token | {per_token} | {mha_per_token} |" in md and "**2.67x** less cache" in md
    page.sidebar.number_input(key="card_context").set_value(1000)
    page.sidebar.number_input(key="card_memory").set_value(1.0).run()
    md = " ".join(m.value for m in page.sidebar.markdown)
    assert f"| largest batch at C in M | {2**30 // (per_token * 1000):,} | {2**30 // (mha_per_token * 1000):,} |" in md
    page.sidebar.selectbox(key="card_dtype").set_value("float32").run()
    md = " ".join(m.value for m in page.sidebar.markdown)
    assert f"| KV cache bytes/token | {2 * per_token} | {2 * mha_per_token} |" in md
    charts = [e for e in page.sidebar.children.values() if e.type == "vega_lite_chart"]  # st.line_chart
    assert len(charts) == 1 and "MiB per sequence" in charts[0].proto.spec
    assert "Cache of one sequence vs context, float32." in " ".join(c.value for c in page.sidebar.caption)


def test_bad_checkpoint_is_an_error_in_the_page(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    at = app(monkeypatch, str(tmp_path))
    assert not at.exception and len(at.error) == 1 and "config.json is corrupt" in at.error[0].value


def test_unreachable_server_is_an_error_in_the_page(monkeypatch):
    pytest.importorskip("openai")
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    at = app(monkeypatch, "--server", f"http://127.0.0.1:{port}")
    assert not at.exception and len(at.error) == 1 and at.error[0].value.startswith("the server is unreachable")


def test_cli_rejects_a_bad_path_before_streamlit(tmp_path, ckpt, capsys):
    assert main(["ui", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err == f"latentformer ui: error: no such checkpoint or run directory: {tmp_path / 'missing'}\n"
    assert main(["ui", str(tmp_path)]) == 1  # a directory without a checkpoint
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["ui", "--server", "localhost:8000"]) == 1
    assert "--server must be an http(s) URL" in capsys.readouterr().err
    assert main(["ui", str(ckpt[0]), "--device", "tpu"]) == 1
    assert "--device 'tpu' is not a device" in capsys.readouterr().err


def test_streamlit_command_is_offline_and_loopback(ckpt):
    from latentformer.cli import build_parser

    args = build_parser().parse_args(["ui", str(ckpt[0]), "--port", "9000", "--device", "cpu"])
    cmd = streamlit_command(args)
    assert cmd[1:4] == ["-m", "streamlit", "run"]
    for flag in ("--server.address=127.0.0.1", "--server.port=9000", "--server.headless=true",
                 "--browser.gatherUsageStats=false", "--server.fileWatcherType=none"):
        assert flag in cmd
    assert cmd[cmd.index("--"):] == ["--", str(Path(ckpt[0]).resolve()), "--device", "cpu"]
    assert Path(cmd[cmd.index("--") - 1]) == APP


def test_the_api_key_reaches_streamlit_in_its_environment_only(monkeypatch):
    """`ui --api-key` used to put the key on the Streamlit child's command line (visible in `ps`)."""
    from latentformer.cli import build_parser

    monkeypatch.delenv("LATENTFORMER_API_KEY", raising=False)
    args = build_parser().parse_args(["ui", "--server", "http://127.0.0.1:8000", "--api-key", "s3cret"])
    assert not any("s3cret" in part for part in streamlit_command(args))
    assert streamlit_env(args)["LATENTFORMER_API_KEY"] == "s3cret"
    monkeypatch.setenv("LATENTFORMER_API_KEY", "from-env")  # inherited as it is
    assert streamlit_env(build_parser().parse_args(["ui", "--server", "http://x:1"]))["LATENTFORMER_API_KEY"] == "from-env"


@pytest.fixture(scope="module")
def server_url(ckpt):
    """`latentformer serve` on the tiny checkpoint, on a free loopback port."""
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "serve", str(ckpt[0]), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("latentformer serve did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_mode_prompt_and_chat(server_url, ckpt, monkeypatch):
    path, model, tok = ckpt
    at = app(monkeypatch, str(path), "--server", server_url)
    assert not at.exception and not at.error
    assert "model `model`" in " ".join(c.value for c in at.sidebar.caption)  # the server's model id
    assert "MLA (kv_lora_rank 16, rope 8, 4 heads)" in " ".join(m.value for m in at.sidebar.markdown)
    start_greedy(at, "Hello", max_new_tokens=12)
    assert not at.error and generated(at) == lf.generate(model, tok, "Hello", max_new_tokens=12, temperature=0)
    at.radio(key="mode").set_value("Chat").run()
    at.text_area(key="message").set_value("hi")
    at.button(key="generate").click().run()
    reply = lf.generate(model, tok, render_chat(tok, [{"role": "user", "content": "hi"}]), max_new_tokens=12,
                        temperature=0, stop=chat_stops(tok)).strip()
    assert [m["content"] for m in at.session_state.messages] == ["hi", reply]
    at.text_area(key="message").set_value("x" * 80)  # over the 64-token context: the server's 400, in the page
    at.button(key="generate").click().run()
    assert not at.exception and len(at.error) == 1 and at.error[0].value.startswith("the server answered 400")
    assert at.text_area(key="message").value == "x" * 80  # the failed message is back in the input
    bare = app(monkeypatch, "--server", server_url)  # no PATH: generation works, the card asks for it
    assert not bare.error and "Give the checkpoint's PATH too" in bare.sidebar.info[0].value
