"""`latentformer train` / `latentformer eval` from the command line: errors and evaluation oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentformer.checkpoint import load
from latentformer.cli import main
from latentformer.data.dataset import TokenData

from .conftest import TINY_MODEL_ARGS

# one thread: on shared cores OpenMP's spin-waiting threads make two threads many times slower
FAST = ["--train.device", "cpu", "--train.threads", "1", "--train.eval_batch_size", "64", "--train.seq_len", "32", "--train.micro_batch_size", "8", "--train.batch_tokens", "256",
        "--train.warmup_steps", "2", "--train.max_time_minutes", "0", "--train.progress", "false", "--train.tensorboard", "false", "--no-sample"]


@pytest.mark.parametrize("extra, message", [
    (["--train.max_steps", "-5"], "train.max_steps"),
    (["--preset", "nope"], "unknown preset"),
    (["--train.seq_len", "128"], "exceeds model.max_seq_len"),
    (["--train.batch_tokens", "300"], "not a multiple"),
    (["--train.bogus", "1"], "unknown config field"),
    (["--modl.n_layers", "2"], "unknown config field"),
    (["--train.lr", "fast"], "train.lr"),
    (["--train.dtype", "fp8"], "train.dtype"),
    (["--train.fp8", "true"], "train.fp8 needs an NVIDIA GPU with FP8 tensor cores"),
    (["--train.fp8_recipe", "blockwise"], "train.fp8_recipe"),
    (["--train.fp8_layers", "attn"], "train.fp8_layers: must be ffn or all"),
    (["--train.teacher", "/nowhere/teacher"], "train.teacher: no such checkpoint or run directory"),
    (["--train.distill_weight", "1.5"], "train.distill_weight"),
])
def test_bad_arguments_one_line_exit_1(sotu_dir, tmp_path, capsys, extra, message):
    code = main(["train", "--data", str(sotu_dir), "--out", str(tmp_path / "run"), *TINY_MODEL_ARGS, *FAST, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and message in err[0], err


def test_missing_data_dir_and_resume_without_run(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 1
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 1
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("latentformer ") for line in err)


def test_existing_run_needs_resume_or_force(sotu_dir, tmp_path, capsys):
    args = ["train", "--data", str(sotu_dir), "--out", str(tmp_path / "run"), *TINY_MODEL_ARGS, *FAST, "--train.max_steps", "2"]
    assert main(args) == 0
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_vocab_follows_tokenizer_unless_explicit(sotu_dir, tmp_path, capsys):
    args = ["train", "--data", str(sotu_dir), *TINY_MODEL_ARGS, *FAST, "--train.max_steps", "1"]
    args = [a for a in args if a not in ("--model.vocab_size", "512")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0  # preset tiny says 4096; the data's 512 wins
    model, tok = load(tmp_path / "a")
    assert model.config.vocab_size == tok.vocab_size == 512
    assert main([*args, "--out", str(tmp_path / "b"), "--model.vocab_size", "300"]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_eval_equals_hand_computed_full_split_loss(sotu_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(sotu_dir), "--out", str(run), *TINY_MODEL_ARGS, *FAST, "--train.max_steps", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(sotu_dir), "--json", "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out)

    # oracle: one window at a time over the whole split, every target once
    model, _ = load(run, device="cpu")
    data = TokenData(sotu_dir)
    tokens = torch.from_numpy(data.tokens("val").astype("int64"))
    T = 32  # the run's training context, the eval default (the model allows 64)
    assert got["seq_len"] == T
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, T):
            x = tokens[s: s + T + 1]
            logits = model(x[:-1][None])[0]
            total += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
            n += len(x) - 1
    assert n == len(tokens) - 1 == got["tokens"]
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    split = data.meta["splits"]["val"]
    assert got["bpb"] == pytest.approx((total / n) * split["tokens"] / (math.log(2) * split["bytes"]), rel=1e-5)
