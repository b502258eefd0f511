"""`attend`: grouped-query attention (H query heads over Hk KV heads) equals multi-head attention over
K and V repeated per query head, whichever way SDPA is reached (folded query rows under a mask or for
one new token, `enable_gqa` for a causal prefill)."""

import pytest
import torch
import torch.nn.functional as F

from latentformer.model.attention import attend


def repeated(q, k, v, scale, mask, causal):
    """The definition: query head h reads KV head h // (H / Hk)."""
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask,
                                          is_causal=causal, scale=scale)


@pytest.mark.parametrize("Hk", [1, 2, 6])  # MQA, GQA, MHA
@pytest.mark.parametrize("T,S,masked", [(1, 9, True), (1, 9, False), (4, 11, True), (5, 5, False)])
def test_grouped_queries_equal_repeated_kv(Hk, T, S, masked):
    torch.manual_seed(0)
    B, H, D, Dv = 3, 6, 8, 5
    q = torch.randn(B, H, T, D, requires_grad=True)
    k = torch.randn(B, Hk, S, D, requires_grad=True)
    v = torch.randn(B, Hk, S, Dv, requires_grad=True)
    mask = None
    if masked:  # a per-row ragged mask: row b sees slots < end_b, causally over the T new tokens
        end = torch.tensor([S, S - 1, S - 2])
        pos = end[:, None] - T + torch.arange(T)  # [B, T]
        mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, S]
    causal = mask is None and T > 1
    got = attend(q, k, v, 0.3, mask)
    want = repeated(q, k, v, 0.3, mask, causal)
    assert got.shape == (B, H, T, Dv)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_token_reads_no_repeated_kv(monkeypatch):
    """A decode step of grouped queries under a mask sends SDPA the KV heads as they are, without
    `enable_gqa` (which SDPA's CUDA kernels under a mask answer by copying K and V per query head)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape, kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k = torch.randn(2, 6, 1, 4), torch.randn(2, 2, 7, 4)
    attend(q, k, k, 0.5, torch.ones(2, 1, 1, 7, dtype=torch.bool))
    assert seen == [(torch.Size([2, 2, 3, 4]), torch.Size([2, 2, 7, 4]), False)]
