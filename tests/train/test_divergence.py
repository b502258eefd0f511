"""Runs that go wrong numerically: an exploding (finite) loss is reported; a non-finite state is
never saved as a checkpoint, ends the run with one line and no sample; metrics.jsonl stays strict
JSON throughout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentformer.checkpoint import step_dirs
from latentformer.cli import main
from latentformer.train.logging import strict_record
from latentformer.train.trainer import NonFiniteError, Trainer

from .conftest import TINY_MODEL_ARGS, run_config
from .test_cli import FAST


def strict_records(run) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_exploding_loss_is_reported(sotu_dir, tmp_path, capsys):
    cfg = run_config(sotu_dir, threads=1, lr=30.0, max_steps=12, warmup_steps=1, eval_tokens=256)
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["diverged"]
    assert "that of a uniform guess (ln 512 = 6.24): training is diverging" in capsys.readouterr().err
    strict_records(tmp_path / "run")


def poison_weights_at(step: int):
    def hook(trainer, at):
        if at == step:
            with torch.no_grad():
                trainer.model.norm.weight[0] = float("nan")

    return hook


def test_non_finite_weights_are_never_saved(sotu_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = run_config(sotu_dir, threads=1, max_steps=8, checkpoint_interval=2, eval_interval=4, eval_tokens=256,
                     max_nonfinite_steps=1000)
    trainer = Trainer(cfg, run, on_step=[poison_weights_at(3)])
    with pytest.raises(NonFiniteError, match=f"step 8 with a non-finite state, which was not saved "
                                             rf"\(the newest checkpoint is {run / 'checkpoints' / 'step_2'}"):
        trainer.fit()
    assert [p.name for p in step_dirs(run)] == ["step_2"]  # not 4, 6 nor 8
    assert not (run / "checkpoints" / "best").exists()  # no eval was finite
    err = capsys.readouterr().err
    assert "step 4: no checkpoint saved: the latest validation loss is not finite" in err
    train, evals = [r for r in strict_records(run) if not r.get("eval")], [r for r in strict_records(run) if r.get("eval")]
    assert train[-1]["loss"] is None and train[-1]["nonfinite"]["loss"] == "nan"
    assert evals[-1]["bpb"] is None and evals[-1]["nonfinite"]["bpb"] == "nan"


def test_cli_ends_a_non_finite_run_with_one_line_and_no_sample(sotu_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATENTFORMER_DEBUG", raising=False)
    real = Trainer.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.on_step.append(poison_weights_at(2))

    monkeypatch.setattr(Trainer, "__init__", init)
    argv = ["train", "--data", str(sotu_dir), "--out", str(tmp_path / "run"), *TINY_MODEL_ARGS, *FAST,
            "--train.max_steps", "4", "--train.max_nonfinite_steps", "100", "--train.sample_tokens", "20"]
    argv.remove("--no-sample")
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "sample" not in out
    assert "non-finite state, which was not saved" in err.strip().splitlines()[-1]


def test_strict_record_names_what_it_nulls():
    record = strict_record({"step": 3, "loss": math.inf, "lr": 1e-3, "moe_load": [1.0, math.nan]})
    assert record == {"step": 3, "loss": None, "lr": 1e-3, "moe_load": [1.0, None],
                      "nonfinite": {"loss": "inf", "moe_load": ["nan"]}}
    json.dumps(record, allow_nan=False)
