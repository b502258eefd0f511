"""Small configurations shared by the model tests."""

from __future__ import annotations

import itertools

from latentformer import ModelConfig

ATTENTION = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10),
    "mla-q": dict(attention="mla", q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10),
    "mla-nonorm": dict(attention="mla", kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                       kv_latent_norm=False),  # kv_a_norm an identity (models converted by interop/to_mla.py)
}
POSITIONS = {
    "rope": dict(),
    "rope-interleave": dict(rope_interleave=True),
    "yarn": dict(yarn_factor=4.0, yarn_original_max_seq_len=16, yarn_mscale=0.707, yarn_mscale_all_dim=0.707),
    "learned": dict(rope=False, pos_embedding="learned"),
    "sinusoid": dict(rope=False, pos_embedding="sinusoid"),
    "sinusoid+rope": dict(pos_embedding="sinusoid"),
}
NORMS = {"pre-rms": dict(), "post-ln": dict(norm="layernorm", norm_placement="post", final_norm=False)}
FFNS = {
    "dense": dict(),
    "moe": dict(n_routed_experts=4, n_shared_experts=1, experts_per_token=2, moe_d_ff=16, first_k_dense_layers=1),
}


def small(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, d_ff=48)
    kw = {**base, **overrides}
    if not kw.get("rope", True) and kw.get("attention") == "mla":
        kw["qk_rope_head_dim"] = 0
    return ModelConfig(**kw)


def grid():
    for (a, av), (p, pv), (n, nv), (f, fv) in itertools.product(ATTENTION.items(), POSITIONS.items(), NORMS.items(), FFNS.items()):
        yield f"{a}|{p}|{n}|{f}", {**av, **pv, **nv, **fv}
