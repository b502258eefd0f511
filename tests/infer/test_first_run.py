"""What a first run does as the README says: eval RUN without --data, --data SOURCE, a run directory as
--tokenizer, and `--stop "\\n\\n"` typed in a shell."""

from __future__ import annotations

import json
import shutil

import pytest
import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.cli import main
from latentformer.cli.generate import unescape
from latentformer.data.prepare import prepare
from latentformer.data.tokenizer import load_tokenizer

TINY = dict(vocab_size=260, n_layers=1, d_model=32, n_heads=2, max_seq_len=64, d_ff=48, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory as `latentformer train` leaves it (config.yaml naming the source texts/, and
    checkpoints/best) with a tiny untrained model, and the data cache moved under tmp_path."""
    from latentformer.train.config import DataConfig, RunConfig

    monkeypatch.setenv("LATENTFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"d{i}.txt").write_text(f"Document {i}: " + "some words, and more words. " * (i + 3), encoding="utf-8")
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "best", lf.Transformer(lf.ModelConfig(**TINY)).eval(), load_tokenizer("byte"))
    cfg = RunConfig(model=lf.ModelConfig(**TINY), data=DataConfig(source=str(texts), tokenizer="byte"))
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_without_data_uses_the_runs_source(run_dir, tmp_path, capsys):
    implicit = _eval(capsys, run_dir)  # prepares texts/ into the cache as train would
    assert implicit["data"] == str(tmp_path / "cache" / "data" / f"{str(tmp_path / 'texts').replace('/', '_')}-byte")
    prepare(str(tmp_path / "texts"), "byte", tmp_path / "explicit", progress=False)
    explicit = _eval(capsys, run_dir, "--data", tmp_path / "explicit")
    assert {k: v for k, v in implicit.items() if k != "data"} == {k: v for k, v in explicit.items() if k != "data"}
    assert _eval(capsys, run_dir, "--data", "texts")["loss"] == explicit["loss"]  # a source, as in train
    assert implicit["tokens"] > 0 and implicit["bpb"] > 0


def test_eval_data_source_without_run_config_uses_the_checkpoint_tokenizer(run_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "best", ckpt)
    result = _eval(capsys, ckpt, "--data", "texts")
    assert result["data"].endswith("-byte") and result["tokens"] > 0


def test_tokenizer_encode_accepts_a_run_dir(run_dir, capsys):
    assert main(["tokenizer", "encode", "--tokenizer", str(run_dir), "Hi"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "[72, 105]"
    assert main(["tokenizer", "decode", "--tokenizer", str(run_dir), "72", "105"]) == 0
    assert capsys.readouterr().out == "Hi\n"


@pytest.mark.parametrize("typed, meant", [(r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\\n", "\\n"), (r"\x", r"\x"),
                                          ("plain", "plain"), ("\n", "\n")])
def test_unescape(typed, meant):
    assert unescape(typed) == meant


def test_stop_escapes_reach_generate(run_dir, capsys, monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs)
        return [""] * len(prompts)

    monkeypatch.setattr("latentformer.infer.generate.generate", fake_generate)
    assert main(["generate", str(run_dir), "--prompt", "x", "--stop", r"\n\n", "--stop", "END", "--device", "cpu"]) == 0
    assert seen["stop"] == ["\n\n", "END"]

