"""The attention modules against a plain per-head re-implementation of MLA (DeepSeek-V2 §2.1) written
from the equations (loops over heads and positions, no shared code with the model).

This is also the guard against known defects of earlier implementations: rope applied to a
concatenation of heads, a nonlinearity after RoPE, a missing causal mask, the normalized
latent computed but unused, and a pre-norm block that ignores its normalized input."""

import math

import pytest
import torch

from latentformer import Transformer
from latentformer.model.attention import AttnContext

from .helpers import small


def rope_ref(v: torch.Tensor, pos: int, theta: float, interleave: bool) -> torch.Tensor:
    """Rotate one vector v [D] at position pos; pairs (2i, 2i+1) or (i, i + D/2)."""
    D = v.shape[0]
    out = v.clone()
    for i in range(D // 2):
        a, b = (2 * i, 2 * i + 1) if interleave else (i, i + D // 2)
        ang = pos * theta ** (-2 * i / D)
        out[a] = v[a] * math.cos(ang) - v[b] * math.sin(ang)
        out[b] = v[b] * math.cos(ang) + v[a] * math.sin(ang)
    if interleave:  # the implementation returns the rotated pairs de-interleaved (same q.k)
        out = torch.cat((out[0::2], out[1::2]))
    return out


def rms(v, w, eps):
    return w * v / torch.sqrt(v.pow(2).mean() + eps)


def mla_ref(attn, cfg, x):
    """x [T, d] -> [T, d], one sequence, straight from the MLA equations."""
    T = x.shape[0]
    H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    outs = []
    for t in range(T):
        heads = []
        for h in range(H):
            if cfg.q_lora_rank:
                cq = rms(attn.q_a_proj.weight @ x[t], attn.q_a_norm.weight, cfg.norm_eps)
                q = (attn.q_b_proj.weight @ cq).view(H, dn + dr)[h]
            else:
                q = (attn.q_proj.weight @ x[t]).view(H, dn + dr)[h]
            q_nope, q_pe = q[:dn], rope_ref(q[dn:], t, cfg.rope_theta, cfg.rope_interleave)
            scores, values = [], []
            for s in range(t + 1):  # causal
                ckv_pe = attn.kv_a_proj.weight @ x[s]
                c = rms(ckv_pe[:r], attn.kv_a_norm.weight, cfg.norm_eps)
                k_pe = rope_ref(ckv_pe[r:], s, cfg.rope_theta, cfg.rope_interleave)  # one key for all heads
                kv = (attn.kv_b_proj.weight @ c).view(H, dn + dv)[h]
                scores.append((q_nope @ kv[:dn] + q_pe @ k_pe) / math.sqrt(dn + dr))
                values.append(kv[dn:])
            p = torch.softmax(torch.stack(scores), 0)
            heads.append((p[:, None] * torch.stack(values)).sum(0))
        outs.append(attn.o_proj.weight @ torch.cat(heads))
    return torch.stack(outs)


def mha_ref(attn, cfg, x):
    T = x.shape[0]
    H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    W = attn.qkv_proj.weight
    Wq, Wk, Wv = W[: H * D], W[H * D: (H + Hk) * D], W[(H + Hk) * D:]
    outs = []
    for t in range(T):
        heads = []
        for h in range(H):
            g = h // (H // Hk)  # the key/value head this query head shares
            q = rope_ref((Wq @ x[t]).view(H, D)[h], t, cfg.rope_theta, cfg.rope_interleave)
            ks = [rope_ref((Wk @ x[s]).view(Hk, D)[g], s, cfg.rope_theta, cfg.rope_interleave) for s in range(t + 1)]
            vs = [(Wv @ x[s]).view(Hk, D)[g] for s in range(t + 1)]
            p = torch.softmax(torch.stack([q @ k for k in ks]) / math.sqrt(D), 0)
            heads.append((p[:, None] * torch.stack(vs)).sum(0))
        outs.append(attn.o_proj.weight @ torch.cat(heads))
    return torch.stack(outs)


def run_module(model, x):
    T = x.shape[1]
    cos, sin = model.rope(torch.arange(T)[None])
    return model.layers[0].attn(x, AttnContext(cos, sin, 0, None))


def randomize_norms(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=12), dict(rope_interleave=True)])
def test_mla_matches_equations(kw):
    cfg = small(attention="mla", kv_lora_rank=16, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, **kw)
    model = Transformer(cfg).eval()
    randomize_norms(model)
    x = torch.randn(1, 7, cfg.d_model)
    with torch.no_grad():
        ours = run_module(model, x)[0]
        ref = mla_ref(model.layers[0].attn, cfg, x[0])
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("kw", [dict(attention="mha"), dict(attention="gqa", n_kv_heads=2), dict(attention="mqa"),
                                dict(attention="mha", rope_interleave=True)])
def test_mha_family_matches_equations(kw):
    cfg = small(**kw)
    model = Transformer(cfg).eval()
    x = torch.randn(1, 7, cfg.d_model)
    with torch.no_grad():
        ours = run_module(model, x)[0]
        ref = mha_ref(model.layers[0].attn, cfg, x[0])
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_block_uses_its_normalized_input(placement):
    cfg = small(norm_placement=placement, final_norm=placement == "pre")
    model = Transformer(cfg).eval()
    randomize_norms(model)
    blk = model.layers[0]
    x = torch.randn(1, 6, cfg.d_model) * 3
    cos, sin = model.rope(torch.arange(6)[None])
    ctx = AttnContext(cos, sin, 0, None)
    with torch.no_grad():
        if placement == "pre":
            h = x + blk.attn(blk.attn_norm(x), ctx)
            ref = h + blk.ffn(blk.ffn_norm(h))
        else:
            h = blk.attn_norm(x + blk.attn(x, ctx))
            ref = blk.ffn_norm(h + blk.ffn(h))
        assert torch.allclose(blk(x, ctx), ref, atol=1e-6)
        # and the norm matters: a model whose norm weights change gives different output
        before = blk(x, ctx)
        blk.attn_norm.weight.mul_(2)
        assert not torch.allclose(blk(x, ctx), before, atol=1e-4)
