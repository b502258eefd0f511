"""MoE routing invariants and the layer against a per-token reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from latentformer.model.moe import MoE

from .helpers import small


def make(**kw):
    base = dict(n_routed_experts=8, n_shared_experts=1, experts_per_token=2, moe_d_ff=16)
    moe = MoE(small(**{**base, **kw}))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def expert_ref(moe, e, x):
    w1, w2 = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
    gate, up = (w1 @ x).chunk(2)
    return w2 @ (F.silu(gate) * up)


@pytest.mark.parametrize("kw", [dict(), dict(router_scoring="sigmoid", routed_scaling_factor=2.5),
                                dict(norm_topk_prob=False), dict(n_expert_groups=4, topk_groups=2, router_scoring="sigmoid"),
                                dict(n_expert_groups=4, topk_groups=1)])
def test_moe_matches_per_token_reference(kw):
    moe = make(**kw).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = moe(x)
        flat = x.reshape(-1, 32)
        weights, idx, scores = moe.router(flat)
        for t in range(flat.shape[0]):
            ref = moe.shared(flat[t])
            for j in range(moe.cfg.experts_per_token):
                ref = ref + weights[t, j] * expert_ref(moe, idx[t, j].item(), flat[t])
            assert torch.allclose(out.reshape(-1, 32)[t], ref, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(router_scoring="sigmoid", routed_scaling_factor=2.5),
                                dict(n_expert_groups=4, topk_groups=2)])
def test_router_invariants(kw):
    moe = make(**kw).eval()
    x = torch.randn(64, 32)
    weights, idx, scores = moe.router(x)
    cfg = moe.cfg
    # exactly top-k distinct experts per token
    assert idx.shape == (64, 2)
    assert (idx[:, 0] != idx[:, 1]).all()
    # normalized top-k weights, times the routed scaling factor
    assert torch.allclose(weights.sum(-1), torch.full((64,), cfg.routed_scaling_factor), atol=1e-5)
    # the chosen experts are the highest scores among the allowed groups
    if cfg.n_expert_groups == 1:
        assert torch.equal(idx.sort(-1).values, scores.topk(2, -1).indices.sort(-1).values)
    else:
        groups = idx // (cfg.n_routed_experts // cfg.n_expert_groups)
        assert all(len(set(g.tolist())) <= cfg.topk_groups for g in groups)


def test_balancing_bias_changes_choice_not_weights():
    moe = make(router_scoring="sigmoid", norm_topk_prob=False).eval()
    x = torch.randn(32, 32)
    _, idx0, scores = moe.router(x)
    with torch.no_grad():
        moe.router.bias[5] = 10.0  # expert 5 now always selected
    weights, idx, scores2 = moe.router(x)
    assert (idx == 5).any(-1).all()
    assert not torch.equal(idx, idx0)
    assert torch.equal(scores, scores2)
    # gate weights are the unbiased scores of the chosen experts
    assert torch.allclose(weights, scores.gather(1, idx))


def test_capacity_drops_are_counted():
    moe = make(capacity_factor=0.5).eval()
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        out = moe(x)
    capacity = math.ceil(0.5 * 40 * 2 / 8)
    assert moe.dropped.item() == (moe.load - capacity).clamp(min=0).sum().item() > 0
    assert moe.load.sum().item() == 80
    # a dropped assignment contributes nothing: recompute by hand, keeping the first `capacity` per expert
    flat = x.reshape(-1, 32)
    weights, idx, _ = moe.router(flat)
    seen = [0] * 8
    with torch.no_grad():
        for t in range(40):
            ref = moe.shared(flat[t])
            for j in range(2):
                e = idx[t, j].item()
                if seen[e] < capacity:
                    ref = ref + weights[t, j] * expert_ref(moe, e, flat[t])
                seen[e] += 1
            assert torch.allclose(out[0, t], ref, atol=1e-5)


def test_no_capacity_never_drops():
    moe = make().eval()
    with torch.no_grad():
        moe(torch.randn(1, 40, 32))
    assert moe.dropped.item() == 0


def test_router_noise_only_in_training():
    moe = make(router_noise=True)
    x = torch.randn(1, 16, 32)
    moe.eval()
    with torch.no_grad():
        assert torch.equal(moe(x), moe(x))
        moe.train()
        assert not torch.equal(moe(x), moe(x))


def test_aux_loss_formula():
    moe = make(aux_loss_coef=0.1).train()
    x = torch.randn(1, 30, 32)
    moe(x)
    _, idx, scores = moe.router(x.reshape(-1, 32))
    counts = torch.bincount(idx.reshape(-1), minlength=8).float()
    ref = 0.1 * (counts * 8 / (30 * 2) * scores.mean(0)).sum()
    assert torch.allclose(moe.aux_loss, ref, atol=1e-6)


def test_bias_update_moves_toward_balance():
    moe = make(router_scoring="sigmoid", router_bias_update_rate=0.01).train()
    with torch.no_grad():
        moe(torch.randn(1, 64, 32))
    load = moe.load.float()
    moe.update_bias()
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(moe.router.bias, expected)
    assert moe.load_since_update.sum() == 0
