"""`latentformer.load` and the generate / chat / info verbs on a saved checkpoint; corrupt checkpoints."""

from __future__ import annotations

import io
import json

import pytest
import torch

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.cli import main
from latentformer.infer.chat import render_chat
from latentformer.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = lf.ModelConfig(vocab_size=260, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, d_ff=48, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, init_std=0.2)
    model, tok = lf.Transformer(cfg).eval(), load_tokenizer("byte")
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "model", model, tok)
    return path, model, tok


def test_load_returns_the_saved_model(ckpt):
    path, model, tok = ckpt
    loaded, loaded_tok = lf.load(path, device="cpu")
    assert loaded_tok.kind == "byte" and loaded.config == model.config
    x = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_cli_generate_matches_python(ckpt, capsys):
    path, model, tok = ckpt
    prompts = ["Hello", "abc def"]
    rc = main(["generate", str(path), "--prompt", prompts[0], "--prompt", prompts[1], "--temperature", "0",
               "--max-new-tokens", "12", "--device", "cpu"])
    assert rc == 0
    expect = lf.generate(model, tok, prompts, max_new_tokens=12, temperature=0)
    assert capsys.readouterr().out == "\n---\n".join(p + c for p, c in zip(prompts, expect)) + "\n"


def test_cli_generate_stream_and_sampling_flags(ckpt, capsys):
    path, model, tok = ckpt
    args = ["generate", str(path), "--prompt", "Hi", "--seed", "5", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.01",
            "--repetition-penalty", "1.2", "--max-new-tokens", "10", "--stop", "zz", "--device", "cpu"]
    assert main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == streamed
    expect = lf.generate(model, tok, "Hi", max_new_tokens=10, seed=5, top_k=40, top_p=0.9, min_p=0.01,
                         repetition_penalty=1.2, stop="zz")
    assert streamed == "Hi" + expect + "\n"


def test_cli_info(ckpt, capsys):
    path, model, tok = ckpt
    assert main(["info", str(path), "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == info["active_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["layers"] == 2 and info["attention"]["kind"] == "mla" and info["max_seq_len"] == 64
    assert info["kv_cache_bytes_per_token"] == (16 + 8) * 2 * 4
    assert info["kv_cache_bytes_per_token_bf16"] == (16 + 8) * 2 * 2
    assert info["tokenizer"] == {"kind": "byte", "vocab_size": 257, "eot_id": 256}
    assert info["flops_per_token_train"] == model.flops_per_token()
    assert main(["info", str(path), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "96 bytes/token (bfloat16)" in text and "mla" in text


def test_cli_chat_loop(ckpt, capsys, monkeypatch):
    path, model, tok = ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\nagain\n"))
    assert main(["chat", str(path), "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0  # EOF ends it
    out = capsys.readouterr().out
    user = {"role": "user", "content": "hello"}
    first = lf.generate(model, tok, render_chat(tok, [user]), max_new_tokens=8, temperature=0, stop="\nUser:")
    history = [user, {"role": "assistant", "content": first.strip()}, {"role": "user", "content": "again"}]
    second = lf.generate(model, tok, render_chat(tok, history), max_new_tokens=8, temperature=0, stop="\nUser:",
                         truncate=True)
    # after /reset the same message gets the same reply; the next turn sees the conversation
    assert out.count(f"> {first}\n") == 2
    assert "(conversation cleared)" in out and f"> {second}\n" in out and "base model" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\nhello\n"))
    assert main(["chat", str(path), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count(">") == 1


def test_cli_chat_hints_at_a_stop_string_that_opens_the_reply(ckpt, capsys, monkeypatch):
    """`chat --stop "\n\n"` on a base model whose replies open with a blank line: every reply is
    empty; say why once."""
    path, model, tok = ckpt
    opening = lf.generate(model, tok, render_chat(tok, [{"role": "user", "content": "hello"}]), max_new_tokens=2, temperature=0)
    assert opening
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhello\n"))
    assert main(["chat", str(path), "--temperature", "0", "--stop", opening, "--max-new-tokens", "8", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("> \n> \n> \n")  # two empty replies, then end of input
    assert captured.err.count("note: empty reply: a --stop string") == 1 and repr(opening) in captured.err


def test_cli_chat_names_the_flag_when_no_prompt_fits(ckpt, capsys, monkeypatch):
    path, _, _ = ckpt
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(path), "--device", "cpu"]) == 1  # 128 new tokens, 64 of context
    assert capsys.readouterr().err == "latentformer chat: error: --max-new-tokens 128 leaves no room for a prompt within max_seq_len=64\n"


def bad_checkpoints(ckpt, tmp_path):
    path, model, tok = ckpt
    truncated = save_checkpoint(tmp_path / "truncated", model, tok)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = save_checkpoint(tmp_path / "garbage", model, tok)
    (garbage / "config.json").write_text("{not json at all")
    wrong = save_checkpoint(tmp_path / "wrong", model, tok)
    (wrong / "config.json").write_text(json.dumps({"format": "latentformer", "model": {"n_layers": -1}}))
    return {"truncated": truncated, "garbage": garbage, "wrong": wrong, "missing": tmp_path / "nope", "empty": tmp_path}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "wrong", "missing", "empty"])
@pytest.mark.parametrize("verb", [["generate", "--prompt", "x"], ["info"], ["chat"]])
def test_corrupt_checkpoint_is_one_line_and_exit_1(ckpt, tmp_path, capsys, kind, verb):
    path = bad_checkpoints(ckpt, tmp_path)[kind]
    rc = main([verb[0], str(path), *verb[1:], "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith(f"latentformer {verb[0]}: error: ")


@pytest.mark.parametrize("flag, value", [("--top-p", "0"), ("--top-p", "1e-300"), ("--temperature", "1e39"),
                                         ("--temperature", "-1"), ("--min-p", "1"), ("--top-k", "-2"),
                                         ("--repetition-penalty", "1e300"), ("--repetition-penalty", "0")])
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_cli_bad_sampling_flag_is_one_line(ckpt, capsys, verb, flag, value):
    """Every sampling flag is checked to a range sampling can follow (top_p 1e-300 is 0 in float32;
    a temperature of 1e39 is inf there), and the error names the flag."""
    path, _, _ = ckpt
    args = [verb, str(path), *(["--prompt", "x"] if verb == "generate" else []), flag, value, "--device", "cpu"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"latentformer {verb}: error: {flag} must be ") and err.count("\n") == 1, err


def test_cli_info_presets(capsys):
    assert main(["info", "--presets", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    with torch.device("meta"):
        tiny = lf.Transformer(lf.ModelConfig.preset("tiny"))
    assert rows["tiny"]["parameters"] == tiny.num_params()
    assert rows["mla-125m"]["kv_cache_bytes_per_token_bf16"] < rows["mha-125m"]["kv_cache_bytes_per_token_bf16"] / 8
    assert main(["info"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
