"""The Streamlit playground behind `latentformer ui` (run as `streamlit run ui_app.py -- ARGS`).

ARGS: `[PATH] [--server URL] [--device D] [--dtype T]`. With PATH alone the checkpoint is loaded
once per process (st.cache_resource) and generates here; with --server the text comes from a
running `latentformer serve` (OpenAI API, streamed; its key from LATENTFORMER_API_KEY) and PATH,
if given, only feeds the model card.

Streamlit reruns this script top to bottom on every interaction, so a generation is a job kept
in st.session_state: the Generate button's callback queues it, the next run streams it into the
page and appends every piece to the job as it arrives. A click on Stop (or on any widget) makes
Streamlit interrupt the streaming run at its next page update and rerun; the run that finds the
job still marked running finishes it as "stopped" with the text it holds. A finished response (prompt mode) or the
conversation (chat mode) lives in session_state and is redrawn on every rerun.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import streamlit as st

MODES = ("Prompt", "Chat")
CACHE_DTYPES = ("bfloat16", "float16", "float32")
REFRESH_S = 0.05  # at most ~20 page updates a second while streaming (each is a websocket message)
EXTRA_SAMPLING = (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0))  # not in the OpenAI API: vLLM's names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="latentformer ui (app)")
    parser.add_argument("path", nargs="?")
    parser.add_argument("--server", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Sampling:
    """The page's sampling controls, as `latentformer.generate` keywords."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    max_new_tokens: int
    seed: int | None


# -- backends: (mode, prompt or messages, sampling) -> text increments ---------------------------
class LocalBackend:
    """Generation in this process with a loaded checkpoint."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.context = model.config.max_seq_len

    def stream(self, mode: str, content, s: Sampling) -> Iterator[str]:
        from latentformer.infer.chat import chat_stops, render_chat
        from latentformer.infer.generate import generate

        if mode == "Chat":  # a conversation keeps its latest turns when it outgrows the context, as `latentformer chat`
            prompt, stop, truncate = render_chat(self.tokenizer, content), chat_stops(self.tokenizer) or None, True
        else:
            prompt, stop, truncate = content, None, False
        return generate(self.model, self.tokenizer, prompt, stream=True, stop=stop, truncate=truncate, **asdict(s))


class ServerBackend:
    """Generation by a running `latentformer serve` (or any OpenAI-compatible server), streamed."""

    def __init__(self, url: str, api_key: str | None) -> None:
        from openai import OpenAI

        base = url.rstrip("/").removesuffix("/v1")
        self.url = base
        self.client = OpenAI(base_url=f"{base}/v1", api_key=api_key or "none", max_retries=0, timeout=30.0)
        model = self.client.models.list().data[0]  # reaches the server once: unreachable -> an error in the page
        self.model_id = model.id
        self.context = (model.model_extra or {}).get("context_length")

    def stream(self, mode: str, content, s: Sampling) -> Iterator[str]:
        extra = {k: getattr(s, k) for k, off in EXTRA_SAMPLING if getattr(s, k) != off}
        common = dict(model=self.model_id, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                      seed=s.seed, stream=True, extra_body=extra or None)
        if mode == "Chat":
            messages = [{"role": m["role"], "content": m["content"]} for m in content]
            response = self.client.chat.completions.create(messages=messages, **common)
        else:
            response = self.client.completions.create(prompt=content, **common)
        return self._pieces(response, chat=mode == "Chat")

    @staticmethod
    def _pieces(response, chat: bool) -> Iterator[str]:
        with response:  # closing the generator (Stop) closes the HTTP stream: the server frees the slot
            for chunk in response:
                if not chunk.choices:
                    continue
                piece = chunk.choices[0].delta.content if chat else chunk.choices[0].text
                if piece:
                    yield piece


def user_error(e: Exception) -> str | None:
    """One line for an error the user can act on, None for a bug (which Streamlit then shows)."""
    try:
        import openai
    except ModuleNotFoundError:
        openai = None
    if openai is not None and isinstance(e, openai.APIConnectionError):
        return f"the server is unreachable: {e}"
    if openai is not None and isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or e.message
        return f"the server answered {e.status_code}: {message}"
    if isinstance(e, (ValueError, FileNotFoundError, OSError)):
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__
    return None


# -- loading (once per process) ------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the checkpoint...")
def load_local(path: str, device: str | None, dtype: str | None) -> LocalBackend:
    import torch

    import latentformer

    model, tokenizer = latentformer.load(path, device=device, dtype=getattr(torch, dtype) if dtype else None)
    return LocalBackend(model, tokenizer)


@st.cache_resource(show_spinner="Connecting to the server...")
def connect(url: str, api_key: str | None) -> ServerBackend:
    return ServerBackend(url, api_key)


@st.cache_resource
def card_model(path: str):
    """The checkpoint's model on the meta device (no weights read): the card's source in --server mode."""
    from latentformer.checkpoint import find_checkpoint, read_config
    from latentformer.serve.model_card import meta_model

    return meta_model(read_config(find_checkpoint(path)))


def open_backend(args: argparse.Namespace):
    """(backend, model for the card or None); raises the loader's errors."""
    if args.server:
        return connect(args.server, os.environ.get("LATENTFORMER_API_KEY")), card_model(args.path) if args.path else None
    if not args.path:
        raise ValueError("give a checkpoint or run directory, or --server URL")
    backend = load_local(args.path, args.device, args.dtype)
    return backend, backend.model


# -- session state --------------------------------------------------------------------------------
def init_state() -> None:
    s = st.session_state
    s.setdefault("messages", [])  # chat mode: [{"role", "content", "stopped"?}]
    s.setdefault("completion", None)  # prompt mode: {"prompt", "text", "stopped"}
    s.setdefault("job", None)  # the generation in flight: {"mode", "content", "sampling", "text", "status"}
    s.setdefault("error", None)
    if "restore_message" in s:
        s.message = s.pop("restore_message")


def sampling_from_state() -> Sampling:
    s = st.session_state
    return Sampling(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p), min_p=float(s.min_p),
                    repetition_penalty=float(s.repetition_penalty), max_new_tokens=int(s.max_new_tokens),
                    seed=None if s.seed is None else int(s.seed))


def on_generate() -> None:
    s = st.session_state
    s.error = None
    if s.mode == "Chat":
        text = s.message.strip()
        if not text:
            s.error = "type a message first"
            return
        s.messages.append({"role": "user", "content": text})
        s.message = ""
        content = list(s.messages)
    else:
        content = s.prompt
    s.job = {"mode": s.mode, "content": content, "sampling": sampling_from_state(), "text": "", "status": "queued"}


def finish(status: str) -> None:
    """End the job in flight ("done" or "stopped"), keeping its text."""
    s = st.session_state
    job, s.job = s.job, None
    if job is None:
        return
    if job["mode"] == "Chat":
        s.messages.append({"role": "assistant", "content": job["text"].strip(), "stopped": status == "stopped"})
    else:
        s.completion = {"prompt": job["content"], "text": job["text"], "stopped": status == "stopped"}


def on_clear() -> None:
    s = st.session_state
    s.messages, s.completion, s.job, s.error = [], None, None, None


# -- the page -------------------------------------------------------------------------------------
def sidebar(model, backend) -> None:
    from latentformer.serve.model_card import attention_summary, cache_curve, largest_batch, mha_equivalent, model_card

    with st.sidebar:
        st.header("Model card")
        if isinstance(backend, ServerBackend):
            st.caption(f"server {backend.url}, model `{backend.model_id}`")
        if model is None:
            st.info("Give the checkpoint's PATH too (`latentformer ui PATH --server URL`) to see its model card.")
            return
        import torch

        cfg = model.config
        st.markdown(f"**{attention_summary(cfg)}**  \n{cfg.n_layers} layers x d_model {cfg.d_model}, "
                    f"context {cfg.max_seq_len:,} tokens")
        left, right = st.columns(2)
        context = int(left.number_input("Context C (tokens)", min_value=1, max_value=10_000_000, value=cfg.max_seq_len,
                                        step=256, key="card_context"))
        memory = right.number_input("Cache memory M (GiB)", min_value=0.0, max_value=100_000.0, value=80.0, step=8.0,
                                    key="card_memory")
        dtype = st.selectbox("Cache dtype", CACHE_DTYPES, key="card_dtype")
        card = model_card(model, getattr(torch, dtype))
        rows = [("parameters", f"{card.parameters:,}"), ("active per token", f"{card.active_parameters:,}"),
                ("KV cache bytes/token", f"{card.kv_bytes_per_token:,}"),
                ("largest batch at C in M", f"{largest_batch(card.kv_bytes_per_token, context, memory):,}")]
        if card.mha_kv_bytes_per_token is None:
            table = "| | this model |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        else:
            mha = [f"{card.mha_parameters:,}", f"{card.mha_active_parameters:,}", f"{card.mha_kv_bytes_per_token:,}",
                   f"{largest_batch(card.mha_kv_bytes_per_token, context, memory):,}"]
            table = "| | this model | MHA equivalent |\n|---|---:|---:|\n" + "\n".join(
                f"| {k} | {v} | {w} |" for (k, v), w in zip(rows, mha))
        st.markdown(table)
        if card.cache_ratio is not None:
            st.markdown(f"**{card.cache_ratio:.2f}x** less cache per token than "
                        f"{attention_summary(mha_equivalent(cfg))}: that many more sequences of {context:,} tokens "
                        f"in {memory:g} GiB.")
        st.line_chart(cache_curve(card, context), x="context", x_label="context (tokens)",
                      y_label="MiB per sequence", height=240)
        st.caption(f"Cache of one sequence vs context, {card.cache_dtype}. MHA equivalent: the same model with "
                   "multi-head attention (n_kv_heads = n_heads, head_dim = d_model / n_heads). M is the memory left "
                   "for the cache after the weights.")


def controls(backend, busy: bool) -> None:
    st.radio("Mode", MODES, horizontal=True, key="mode", disabled=busy)
    context = backend.context or 100_000
    row = st.columns(4)
    row[0].slider("Temperature (0 = greedy)", 0.0, 2.0, 0.8, 0.05, key="temperature")
    row[1].number_input("Top-k (0 = off)", min_value=0, max_value=1_000_000, value=0, key="top_k")
    row[2].slider("Top-p", 0.01, 1.0, 1.0, 0.01, key="top_p")
    row[3].slider("Min-p", 0.0, 1.0, 0.0, 0.01, key="min_p")
    row = st.columns(4)
    row[0].slider("Repetition penalty", 0.5, 2.0, 1.0, 0.05, key="repetition_penalty")
    row[1].number_input("Max new tokens", min_value=1, max_value=context, value=min(128, max(1, context // 2)),
                        key="max_new_tokens")
    row[2].number_input("Seed (empty = random)", min_value=0, max_value=2**53 - 1, value=None, step=1, key="seed")
    if isinstance(backend, ServerBackend):
        row[3].caption("Top-k, min-p and repetition penalty go to the server as extra fields; "
                       "a server that does not know them ignores them.")
    if st.session_state.mode == "Chat":
        st.text_area("Message", key="message", height=90, disabled=busy)
    else:
        st.text_area("Prompt", key="prompt", height=120, disabled=busy)
    # widths by label: a ninth of the page cut "Generate" to "Gener…" at 1400 px
    buttons = st.columns([2, 1.3, 1.3, 5.4])
    buttons[0].button("Generate", type="primary", key="generate", on_click=on_generate, disabled=busy)
    # no callback: the click itself interrupts the streaming run, and the next run finishes the job (main)
    buttons[1].button("Stop", key="stop", disabled=not busy)
    buttons[2].button("Clear", key="clear", on_click=on_clear)


def show_history() -> None:
    s = st.session_state
    if s.mode == "Chat":
        for m in s.messages:
            with st.chat_message(m["role"]):
                st.text(m["content"])
                if m.get("stopped"):
                    st.caption("stopped")
    elif s.completion is not None:
        c = s.completion
        with st.container(border=True):
            st.text(c["prompt"] + c["text"])
        st.caption(("stopped after " if c["stopped"] else "") + f"{len(c['text']):,} generated characters")


def stream_job(backend) -> None:
    """Stream the queued job into the page; the job's text grows with every piece (kept if interrupted)."""
    s = st.session_state
    job = s.job
    job["status"] = "running"
    chat = job["mode"] == "Chat"
    if chat:
        with st.chat_message("assistant"):
            slot = st.empty()
    else:
        slot = st.container(border=True).empty()
    pieces = None
    try:
        pieces = backend.stream(job["mode"], job["content"], job["sampling"])
        shown = 0.0
        for piece in pieces:
            job["text"] += piece
            if time.monotonic() - shown >= REFRESH_S:
                slot.text(job["text"] if chat else job["content"] + job["text"])
                shown = time.monotonic()
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        s.job, s.error = None, message
        if chat:  # the reply failed: the message goes back into the input (set before its widget, next run)
            s.restore_message = s.messages.pop()["content"]
    finally:
        if pieces is not None:
            pieces.close()
    if s.job is not None:
        finish("done")
    st.rerun()  # redraw with the job finished (buttons re-enabled, response in the history)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    st.set_page_config(page_title="latentformer", layout="wide", initial_sidebar_state=440)  # int: sidebar width (px)
    st.title("latentformer playground")
    init_state()
    try:
        backend, model = open_backend(args)
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        st.error(message)
        st.stop()
    s = st.session_state
    if s.job is not None and s.job["status"] == "running":
        finish("stopped")  # the run streaming it was interrupted by a click: Stop, or any other widget
    sidebar(model, backend)
    busy = s.job is not None
    controls(backend, busy)
    with st.container(key="output"):
        show_history()
        if s.error:
            st.error(s.error)
        if busy:
            stream_job(backend)


main(sys.argv[1:])
