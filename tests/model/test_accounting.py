"""Accounting oracles: parameter counts (closed form), cache bytes, FLOPs."""

import pytest
import torch

from latentformer import ModelConfig, Transformer

from .helpers import grid, small


def closed_form_params(c: ModelConfig, active: bool = False) -> int:
    d, L, H = c.d_model, c.n_layers, c.n_heads
    norm = d if c.norm == "rmsnorm" else 2 * d  # LayerNorm has a bias
    if c.attention == "mla":
        dn, dr, dv, r, rq = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank
        q = d * rq + rq + rq * H * (dn + dr) if rq else d * H * (dn + dr)
        attn = q + d * (r + dr) + (r if c.kv_latent_norm else 0) + r * H * (dn + dv) + H * dv * d
    else:
        attn = d * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * d
    ffn_mats = 3 if c.ffn == "swiglu" else 2
    dense = ffn_mats * d * c.d_ff
    total = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    total += {"none": 0, "learned": c.max_seq_len * d, "sinusoid": 2 * d}[c.pos_embedding]
    total += norm if c.final_norm else 0
    for layer in range(L):
        total += attn + 2 * norm
        if c.layer_is_moe(layer):
            experts = c.experts_per_token if active else c.n_routed_experts
            total += experts * ffn_mats * d * c.moe_d_ff + ffn_mats * d * c.moe_d_ff * c.n_shared_experts
            total += c.n_routed_experts * d * (2 if c.router_noise and not active else 1)
        else:
            total += dense
    # each MTP module: its two input norms, eh_proj [d, 2d], a dense block, its final norm
    total += c.mtp_depth * (2 * norm + 2 * d * d + attn + 2 * norm + dense + (norm if c.final_norm else 0))
    return total


CASES = dict(grid())


@pytest.mark.parametrize("name", list(CASES))
def test_num_params_equals_closed_form(name):
    cfg = small(**CASES[name])
    model = Transformer(cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values()) == closed_form_params(cfg)
    assert model.num_params(active=True) == closed_form_params(cfg, active=True)


@pytest.mark.parametrize("extra", [dict(tie_embeddings=True), dict(router_noise=True, n_routed_experts=4, experts_per_token=1),
                                   dict(ffn="gelu"), dict(attention="mla", q_lora_rank=8), dict(mtp_depth=2),
                                   dict(mtp_depth=1, n_routed_experts=4, experts_per_token=1, attention="mla")])
def test_num_params_variants(extra):
    cfg = small(**extra)
    assert Transformer(cfg).num_params() == closed_form_params(cfg)
    assert Transformer(cfg).num_params(active=True) == closed_form_params(cfg, active=True)


def test_matched_125m_presets_within_two_percent():
    counts = {}
    for name in ("mla-125m", "mha-125m", "gqa-125m", "mqa-125m"):
        with torch.device("meta"):
            counts[name] = Transformer(ModelConfig.preset(name)).num_params()
    lo, hi = min(counts.values()), max(counts.values())
    assert hi / lo - 1 < 0.02, counts
    assert 110e6 < lo < 135e6


def test_preset_counts_documented():
    with torch.device("meta"):
        assert Transformer(ModelConfig.preset("latentformer-348m")).num_params() == 348_719_360
        lite = Transformer(ModelConfig.preset("deepseek-v2-lite"))
    # DeepSeek-V2-Lite: 15.7B total; 2.4B active (their count leaves out the input embedding)
    assert abs(lite.num_params() / 1e9 - 15.7) < 0.05
    active = lite.num_params(active=True) - lite.embed.weight.numel()
    assert abs(active / 1e9 - 2.4) < 0.1
    assert lite.kv_cache_bytes_per_token(torch.bfloat16) == (512 + 64) * 27 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["mla", "mha", "gqa", "mqa"])
def test_cache_bytes_formula_and_allocation(attention, dtype):
    cfg = small(**{"mla": {}, "mha": {"attention": "mha"}, "gqa": {"attention": "gqa", "n_kv_heads": 2},
                   "mqa": {"attention": "mqa"}}[attention])
    model = Transformer(cfg)
    per_token = model.kv_cache_bytes_per_token(dtype)
    if attention == "mla":
        assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * dtype.itemsize
    else:
        assert per_token == 2 * cfg.n_kv_heads * cfg.head_dim * cfg.n_layers * dtype.itemsize
    cache = model.make_cache(3, 40, dtype=dtype)
    assert cache.nbytes == per_token * 3 * 40
    # each layer's module answers for its own buffers: what its make_cache allocates per token
    for blk, buffers in zip(model.layers, cache.layers):
        allocated = sum(t.numel() * t.element_size() for t in buffers)
        assert allocated == blk.attn.cache_values_per_token(cfg) * dtype.itemsize * 3 * 40


def test_flops_per_token_matches_formula():
    cfg = small(attention="mha")
    model = Transformer(cfg)
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed")) + \
        (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    attn = 6 * cfg.n_layers * cfg.n_heads * 2 * cfg.head_dim * 64
    assert model.flops_per_token(64) == 6 * n_matmul + attn
    # D = 2 MTP modules: their matrices, the output layer twice more, two more attention layers
    mtp = Transformer(cfg.replace(mtp_depth=2))
    extra = sum(p.numel() for n, p in mtp.named_parameters() if n.startswith("mtp.") and p.dim() == 2)
    assert mtp.flops_per_token(64) == 6 * (n_matmul + extra + 2 * cfg.vocab_size * cfg.d_model) + attn * (cfg.n_layers + 2) / cfg.n_layers
