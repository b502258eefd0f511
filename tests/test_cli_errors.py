"""Bad input to prepare / tokenizer / generate / chat / info / eval and to --config: one line on stderr,
a non-zero exit, no traceback, and nothing outside the command's own output changed (the whole tmp
tree is hashed before and after each command)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.cli import main
from latentformer.data.prepare import prepare
from latentformer.data.tokenizer import load_tokenizer

TEXTS = ["The first document, with some words.\n", "A second one: more words here.", "third\n\nhas paragraphs", "fourth"]
TINY = dict(vocab_size=260, n_layers=1, d_model=32, n_heads=2, max_seq_len=64, d_ff=48, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, init_std=0.2)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: files as (size, sha256), directories and links by kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            data = p.read_bytes()
            out[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """texts/ (a source), data/ (prepared from it), ckpt/ and nan/ (checkpoints), run/ (a run directory
    whose config.yaml records texts/ as its source), user/ (a directory of the user's files)."""
    root = tmp_path_factory.mktemp("tree")
    texts = root / "texts"
    texts.mkdir()
    for i, t in enumerate(TEXTS):
        (texts / f"d{i}.txt").write_text(t, encoding="utf-8")
    prepare(str(texts), "byte", root / "data", val_docs=1, progress=False)
    torch.manual_seed(0)
    model, tok = lf.Transformer(lf.ModelConfig(**TINY)).eval(), load_tokenizer("byte")
    save_checkpoint(root / "ckpt", model, tok)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")  # one NaN weight: every later logit is NaN
    save_checkpoint(root / "nan", model, tok)
    from latentformer.train.config import DataConfig, RunConfig

    run = root / "run"
    shutil.copytree(root / "ckpt", run / "checkpoints" / "best")
    cfg = RunConfig(model=lf.ModelConfig(**TINY), data=DataConfig(source=str(texts), tokenizer="byte"))
    (run / "config.yaml").write_text(cfg.to_yaml())
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("my own file\n")
    return root


def run_cli(capsys, monkeypatch, root: Path, argv: list[str], own_output: str | None = None):
    """Run the CLI in `root`; returns (rc, stderr) after checking that nothing outside `own_output` changed."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("LATENTFORMER_CACHE", str(root / "cache"))
    monkeypatch.delenv("LATENTFORMER_DEBUG", raising=False)
    keep = lambda snap: {k: v for k, v in snap.items() if own_output is None or not k.startswith(own_output)}
    before = snapshot(root)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert keep(snapshot(root)) == keep(before), f"{argv} changed the tree"
    return rc, err


def assert_one_line(rc, err, verb: str, needle: str):
    assert rc not in (0, None), err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"latentformer {verb}: error: ") and needle in err, err


# --- prepare: never replace an input or a directory prepare did not make ------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--source", "texts", "--out", "texts", "--force"], "is or contains the input"),
    (["--source", "texts/d0.txt", "--out", ".", "--force"], "is or contains the input"),
    (["--source", "texts", "--out", "data", "--tokenizer", "data", "--force"], "is or contains the input"),
    (["--source", "texts", "--out", "user", "--force"], "not a data directory made by latentformer"),
    (["--source", "texts", "--out", "user"], "not a data directory made by latentformer"),
    (["--source", "texts", "--out", "data", "--tokenizer", "gpt2"], "prepared from other inputs"),  # no --force
    (["--source", "texts", "--out", "texts/d0.txt", "--force"], "exists and is not a directory"),
    (["--source", "nowhere", "--out", "o"], "no such file or directory"),
    (["--source", "texts", "--out", "o", "--tokenizer", "bpe:big"], "bpe:<vocab size>"),
    (["--source", "texts", "--out", "o", "--val-docs", "4"], "--val-docs must be between 1 and 3"),
])
def test_prepare_refuses_inputs_and_foreign_dirs(tree, capsys, monkeypatch, argv, needle):
    rc, err = run_cli(capsys, monkeypatch, tree, ["prepare", *argv, "--no-progress"])
    assert_one_line(rc, err, "prepare", needle)


# --- generate / chat / info: flags and checkpoints ----------------------------------------------------
@pytest.mark.parametrize("verb", ["generate", "chat", "info"])
@pytest.mark.parametrize("device, needle", [
    ("bogus", "--device 'bogus' is not a device"),
    ("cuda:x", "is not a device"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_device_names_the_flag(tree, capsys, monkeypatch, verb, device, needle):
    extra = ["--prompt", "x"] if verb == "generate" else []
    rc, err = run_cli(capsys, monkeypatch, tree, [verb, "ckpt", *extra, "--device", device])
    assert_one_line(rc, err, verb, needle)
    assert "corrupt" not in err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "nan", "--prompt", "x", "--max-new-tokens", "4"], "weights are not finite"),
    (["generate", "nan", "--prompt", "x", "--max-new-tokens", "4", "--temperature", "0"], "weights are not finite"),
    (["generate", "ckpt", "--prompt", "x", "--seed", str(2**64)], "--seed must be in [0, 2^64)"),
    (["generate", "ckpt", "--prompt", "x", "--seed", "-1"], "--seed must be in [0, 2^64)"),
    (["generate", "ckpt", "--prompt", "x", "--temperature", "nan"], "--temperature must be a number in [0, 3.4e+38]"),
    (["generate", "ckpt", "--prompt", "x", "--max-new-tokens", "64"], "--max-new-tokens 64 leaves no room for a prompt"),
    # the flags, not the Python arguments (`truncate=True`), at the command line
    (["generate", "ckpt", "--prompt", "x" * 70, "--max-new-tokens", "4"],
     "prompt 0 has 70 tokens; with --max-new-tokens 4 that exceeds max_seq_len=64 (shorten it or pass --truncate"),
    (["generate", "user", "--prompt", "x"], "holds no checkpoint"),
    (["generate", "ckpt"], "the following arguments are required: --prompt"),
    (["generate", "ckpt", "--prompt", "x", "--top-k", "many"], "invalid int value"),
    (["info", "ckpt", "--dtype", "float8"], "invalid choice"),
])
def test_generate_bad_input(tree, capsys, monkeypatch, argv, needle):
    rc, err = run_cli(capsys, monkeypatch, tree, argv)
    assert_one_line(rc, err, argv[0], needle)


def test_tiny_temperature_is_greedy(tree, capsys, monkeypatch):
    monkeypatch.chdir(tree)
    args = ["generate", "ckpt", "--prompt", "The", "--max-new-tokens", "8", "--device", "cpu"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    for t in ("1e-45", "1e-30"):
        assert main([*args, "--temperature", t, "--seed", "3"]) == 0
        out, err = capsys.readouterr()
        assert out == greedy and err == ""


def test_info_describes_a_non_finite_checkpoint(tree, capsys, monkeypatch):
    rc, err = run_cli(capsys, monkeypatch, tree, ["info", "nan", "--device", "cpu"])
    assert rc == 0 and err == ""


# --- tokenizer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["decode", "--tokenizer", "byte", "300"], "id 300 is out of range for the byte tokenizer"),
    (["decode", "--tokenizer", "gpt2", "50257"], "id 50257 is out of range for the gpt2 tokenizer"),
    (["decode", "--tokenizer", "gpt2", "--", "-1"], "id -1 is out of range"),
    (["decode", "--tokenizer", "run", "--", "-5"], "id -5 is out of range for the byte tokenizer"),
    (["encode", "--tokenizer", "user", "hi"], "holds no tokenizer_meta.json"),
    (["train", "--source", "texts", "--vocab-size", "300", "--out", "texts/d1.txt"], "is or lies inside the source 'texts'"),
    (["train", "--source", "texts", "--vocab-size", "300", "--out", "user/notes.txt", "--force"], "is not a tokenizer file"),
    (["train", "--source", "texts", "--vocab-size", "300", "--out", "user"], "is a directory"),
])
def test_tokenizer_bad_input(tree, capsys, monkeypatch, argv, needle):
    rc, err = run_cli(capsys, monkeypatch, tree, ["tokenizer", *argv])
    assert_one_line(rc, err, "tokenizer", needle)


# --- eval and data directories ---------------------------------------------------------------------------
def test_meta_without_dtype(tree, capsys, monkeypatch):
    bad = tree / "bad-meta"
    shutil.copytree(tree / "data", bad)
    meta = json.loads((bad / "meta.json").read_text())
    del meta["dtype"]
    (bad / "meta.json").write_text(json.dumps(meta))
    try:
        rc, err = run_cli(capsys, monkeypatch, tree, ["eval", "ckpt", "--data", "bad-meta", "--device", "cpu"])
        assert_one_line(rc, err, "eval", "field 'dtype' is missing")
        assert "bad-meta/meta.json" in err
    finally:
        shutil.rmtree(bad)


@pytest.mark.parametrize("argv, needle", [
    (["ckpt"], "not part of a run directory"),
    (["ckpt", "--data", "nowhere"], "no such file or directory"),
    (["ckpt", "--data", "data", "--device", "bogus"], "--device 'bogus' is not a device"),
    (["ckpt", "--data", "data", "--seq-len", "65"], "--seq-len must be in [1, 64]"),
    (["ckpt", "--data", "user", "--device", "cpu"], "at least 2"),
])
def test_eval_bad_input(tree, capsys, monkeypatch, argv, needle):
    rc, err = run_cli(capsys, monkeypatch, tree, ["eval", *argv], own_output="cache")
    *info, last = err.splitlines()  # a source to prepare is announced first ("data: SOURCE ... -> DIR")
    assert rc == 1 and "Traceback" not in err and all(line.startswith("data: ") for line in info), err
    assert last.startswith("latentformer eval: error: ") and needle in last, err


# --- config files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 4, "is not UTF-8 text"),
    (b"model:\n  n_layers: 2\x00\n", "is not valid YAML"),
    (b"- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_file_is_named(tree, capsys, monkeypatch, content, needle):
    path = tree / "run.yaml"
    path.write_bytes(content)
    try:
        rc, err = run_cli(capsys, monkeypatch, tree, ["train", "--config", "run.yaml", "--train.device", "cpu"])
        assert_one_line(rc, err, "train", needle)
        assert "run.yaml" in err
    finally:
        path.unlink()


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "mha-125m", "--model.kv_lora_rank", "64"], "kv_lora_rank: is a field of attention mla, unused by attention mha"),
    (["--model.attention", "gqa", "--model.n_kv_heads", "2", "--model.latent_norm_eps", "1e-6"],
     "latent_norm_eps: is a field of attention mla, unused by attention gqa"),
    (["--preset", "mla-125m", "--model.head_dim", "64"], "head_dim: is a field of attention mha/gqa/mqa, unused by attention mla"),
])
def test_a_field_of_another_attention_kind_is_named(tree, capsys, monkeypatch, argv, needle):
    rc, err = run_cli(capsys, monkeypatch, tree, ["train", *argv, "--train.device", "cpu"])
    assert_one_line(rc, err, "train", needle)


def test_usage_errors_are_one_line(tree, capsys, monkeypatch):
    for argv in (["bogus-verb"], ["prepare"], ["tokenizer", "decode", "x"], ["eval"]):
        rc, err = run_cli(capsys, monkeypatch, tree, argv)
        assert rc == 2 and err.count("\n") == 1 and "error: " in err and "--help" in err, err


def test_stdout_closed_early_ends_quietly():
    """`latentformer info --presets | head -1`: the reader is gone before the command writes; no
    "Broken pipe" error, the status a shell gives a process ended by SIGPIPE."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(lf.__file__).parents[1])}
    env.pop("LATENTFORMER_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "info", "--presets", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the child has imported anything, so its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
