"""train.teacher: distillation through the trainer (its oracles: a model distilled from itself gets no
gradient; distilling pulls a model's next-token distributions to the teacher's) and its refusals."""

from __future__ import annotations

import json

import pytest
import torch

from latentformer import ModelConfig, Transformer
from latentformer.checkpoint import save_checkpoint
from latentformer.data.tokenizer import load_tokenizer
from latentformer.train.trainer import Trainer

from .conftest import TINY_MODEL, run_config

MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def checkpoint(path, data_dir, head_scale: float = 1.0, **model) -> str:
    torch.manual_seed(7)
    m = Transformer(ModelConfig(**{**TINY_MODEL, **model}))
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)
    return str(save_checkpoint(path, m, load_tokenizer(data_dir)))


def test_distilling_from_itself_gives_no_gradient(sotu_dir, tmp_path):
    """Teacher = the weights the run starts from: the KL and its gradient are 0, so distill_weight w
    scales the step's gradient norm to (1 - w) x the cross-entropy's."""
    teacher = checkpoint(tmp_path / "t", sotu_dir, head_scale=20.0)  # peaked distributions: a KL that could be large
    norms = {}
    for w in (0.0, 0.5, 1.0):
        trainer = Trainer(run_config(sotu_dir, teacher=teacher, distill_weight=w), tmp_path / f"run{w}", init_from=teacher)
        loss, norms[w], finite = trainer.train_step()
        assert finite and loss > 1.0  # the logged loss is the cross-entropy on the data, whatever w
    assert norms[0.0] > 0.1
    assert norms[0.5] == pytest.approx(0.5 * norms[0.0], rel=1e-4)
    assert norms[1.0] < 1e-5 * norms[0.0]


def kl_to_teacher(trainer: Trainer) -> float:
    """Mean KL(teacher || model) over a validation batch."""
    x, y, _ = next(trainer.data.eval_batches("val", 16, trainer.cfg.train.seq_len))
    with torch.no_grad():
        out = trainer.model.eval()(x, y, teacher=(trainer.teacher.final_hidden(x), trainer.teacher.lm_head.weight))
    trainer.model.train()
    return out.distill_loss.item()


def test_distillation_pulls_the_model_to_the_teacher(sotu_dir, tmp_path):
    """A fresh MLA model distilled from a wider GQA teacher (a run directory, trained a little first):
    the KL on held-out windows falls to a fraction of its start; without the teacher (distill_weight 0,
    the same steps, the cross-entropy alone) it falls far less."""
    gqa = dict(attention="gqa", n_heads=4, n_kv_heads=2, d_model=96)
    cfg = run_config(sotu_dir, max_steps=40, lr=1e-2)
    cfg.model = ModelConfig(**{**{k: v for k, v in TINY_MODEL.items() if k not in MLA_FIELDS}, **gqa})
    Trainer(cfg, tmp_path / "teacher").fit()
    kl = {}
    for w in (0.0, 1.0):
        trainer = Trainer(run_config(sotu_dir, teacher=str(tmp_path / "teacher"), distill_weight=w, max_steps=40, lr=1e-2),
                          tmp_path / f"run{w}")
        start = kl_to_teacher(trainer)
        trainer.fit()
        kl[w] = (start, kl_to_teacher(trainer))
        logged = [r["distill_loss"] for r in map(json.loads, (tmp_path / f"run{w}" / "metrics.jsonl").read_text().splitlines())
                  if not r.get("eval")]
        assert len(logged) == 40 // 2 and logged[0] > logged[-1]  # every logged step has its KL, also at w = 0
        if w:
            assert logged[-1] < 0.3 * logged[0], logged
    assert kl[1.0][0] > 0.5, kl  # far from the teacher at the start
    assert kl[1.0][1] < 0.3 * kl[1.0][0], kl
    assert kl[1.0][1] < 0.5 * kl[0.0][1], kl


def test_teacher_refusals(sotu_dir, tmp_path):
    with pytest.raises(ValueError, match="train.teacher: no such checkpoint"):
        Trainer(run_config(sotu_dir, teacher=str(tmp_path / "missing")), tmp_path / "a")
    other = str(save_checkpoint(tmp_path / "byte", Transformer(ModelConfig(**{**TINY_MODEL, "vocab_size": 260})),
                                load_tokenizer("byte")))
    with pytest.raises(ValueError, match="tokenizer is not the data's"):
        Trainer(run_config(sotu_dir, teacher=other), tmp_path / "b")
    wide = checkpoint(tmp_path / "wide", sotu_dir, vocab_size=640)  # the data's tokenizer, a larger output layer
    with pytest.raises(ValueError, match="640 rows, the model's 512"):
        Trainer(run_config(sotu_dir, teacher=wide), tmp_path / "c")
    cfg = run_config(sotu_dir, teacher=checkpoint(tmp_path / "t", sotu_dir))
    cfg.model = cfg.model.replace(token_dropout=0.1)
    with pytest.raises(ValueError, match="token_dropout must be 0"):
        Trainer(cfg, tmp_path / "d")
