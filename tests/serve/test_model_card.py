"""The UI's model card against the model's own accounting and closed forms."""

from __future__ import annotations

import pytest
import torch

from latentformer import ModelConfig, Transformer
from latentformer.serve.model_card import (GIB, MIB, attention_summary, cache_curve, largest_batch, meta_model,
                                           mha_equivalent, model_card)


def mla(**kw) -> ModelConfig:
    base = dict(vocab_size=300, n_layers=3, d_model=64, n_heads=4, max_seq_len=128, d_ff=96, kv_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_card_matches_the_model_and_the_closed_forms(dtype):
    cfg = mla()
    model = Transformer(cfg)
    card = model_card(model, dtype)
    b = dtype.itemsize
    assert card.parameters == model.num_params() == card.active_parameters
    assert card.kv_bytes_per_token == model.kv_cache_bytes_per_token(dtype) == (24 + 8) * 3 * b  # (r + dr) L
    assert card.mha_kv_bytes_per_token == 2 * 3 * 4 * (64 // 4) * b  # 2 L H (d / H)
    assert card.cache_ratio == pytest.approx(2 * 64 / 32)
    assert (card.context, card.n_layers, card.d_model, card.cache_dtype) == (128, 3, 64, str(dtype)[6:])
    assert card.attention == "MLA (kv_lora_rank 24, rope 8, 4 heads)"


def test_mha_equivalent_is_the_same_model_with_mha():
    cfg = mla(q_lora_rank=32)
    eq = mha_equivalent(cfg)
    assert (eq.attention, eq.n_kv_heads, eq.head_dim) == ("mha", 4, 16)
    assert (eq.d_model, eq.n_heads, eq.n_layers, eq.vocab_size, eq.d_ff, eq.max_seq_len) == (64, 4, 3, 300, 96, 128)
    mha = Transformer(eq)
    card = model_card(Transformer(cfg), torch.float32)
    assert card.mha_parameters == mha.num_params()
    assert card.mha_kv_bytes_per_token == mha.kv_cache_bytes_per_token(torch.float32)
    # MHA params, closed form: embeddings (untied) + per layer 4 d^2 attention + 3 d d_ff SwiGLU + 2 norms, + final norm
    d = 64
    assert card.mha_parameters == 2 * 300 * d + 3 * (4 * d * d + 3 * d * 96 + 2 * d) + d


def test_moe_card_counts_active_parameters():
    cfg = mla(n_routed_experts=4, experts_per_token=1, moe_d_ff=32, n_shared_experts=1)
    model = Transformer(cfg)
    card = model_card(model)
    assert card.active_parameters == model.num_params(active=True) < card.parameters == model.num_params()
    assert card.parameters - card.active_parameters == 3 * 3 * (3 * 64 * 32)  # 3 layers x 3 unused experts
    assert card.mha_parameters - card.mha_active_parameters == card.parameters - card.active_parameters


def test_gqa_card_and_mha_itself():
    gqa = ModelConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=8, n_kv_heads=2, attention="gqa", d_ff=64)
    card = model_card(Transformer(gqa), torch.float16)
    assert card.kv_bytes_per_token == 2 * 2 * 2 * 8 * 2 and card.mha_kv_bytes_per_token == 2 * 2 * 8 * 8 * 2
    assert card.cache_ratio == 4.0 and card.attention == "GQA (8 heads, 2 KV heads of 8)"
    mha = ModelConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=8, attention="mha", d_ff=64)
    card = model_card(Transformer(mha))
    assert card.cache_ratio == 1.0 and card.mha_parameters == card.parameters


def test_meta_model_reads_no_weights_and_agrees():
    cfg = ModelConfig.preset("mla-125m")
    meta = meta_model(cfg)
    assert next(meta.parameters()).is_meta
    card = model_card(meta)
    assert card.kv_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 2
    assert card.mha_kv_bytes_per_token == 2 * cfg.n_layers * cfg.d_model * 2


def test_no_mha_equivalent_when_head_dim_is_unusable():
    cfg = mla(d_model=36, n_heads=4)  # head_dim 9: odd, rope needs even
    with pytest.raises(ValueError, match="head_dim"):
        mha_equivalent(cfg)
    card = model_card(Transformer(cfg))
    assert card.mha_kv_bytes_per_token is None and card.cache_ratio is None
    assert "MHA equivalent" not in cache_curve(card, 100)


def test_largest_batch():
    assert largest_batch(1, 1, 1.0) == GIB
    assert largest_batch(96, 1000, 1.0) == GIB // 96000
    # DeepSeek-V2's shape at 32k context in 80 GiB, bf16: 576 x 60 layers x 2 bytes per token
    per_token = 576 * 60 * 2
    assert largest_batch(per_token, 32768, 80) == (80 * GIB) // (per_token * 32768) == 37
    assert largest_batch(per_token, 32768, 0) == 0
    assert largest_batch(100, 10, 0.5) == (GIB // 2) // 1000
    with pytest.raises(ValueError, match="context"):
        largest_batch(100, 0, 1.0)
    with pytest.raises(ValueError, match="memory"):
        largest_batch(100, 10, -1)


def test_cache_curve():
    card = model_card(Transformer(mla()), torch.bfloat16)
    data = cache_curve(card, 1024, points=5)
    assert data["context"] == [0, 256, 512, 768, 1024]
    assert data["this model"] == [c * card.kv_bytes_per_token / MIB for c in data["context"]]
    assert data["MHA equivalent"][-1] == 1024 * card.mha_kv_bytes_per_token / MIB
    assert data["MHA equivalent"][-1] / data["this model"][-1] == pytest.approx(card.cache_ratio)
    with pytest.raises(ValueError):
        cache_curve(card, 0)


def test_attention_summary_q_lora():
    assert attention_summary(mla(q_lora_rank=32)) == "MLA (kv_lora_rank 24, rope 8, q_lora_rank 32, 4 heads)"
