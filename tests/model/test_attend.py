"""`attend`: grouped-query attention (H query heads over Hk KV heads) equals multi-head attention over
K and V repeated per query head, whichever way SDPA is reached (fp32: folded query rows under a mask or
for one new token; `enable_gqa` for a causal prefill and in half precision)."""

import pytest
import torch
import torch.nn.functional as F

from latentformer.model.attention import attend


def repeated(q, k, v, scale, mask, causal):
    """The definition: query head h reads KV head h // (H / Hk)."""
    G = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask,
                                          is_causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hk", [1, 2, 6])  # MQA, GQA, MHA
@pytest.mark.parametrize("T,S,masked", [(1, 9, True), (1, 9, False), (4, 11, True), (5, 5, False)])
def test_grouped_queries_equal_repeated_kv(Hk, T, S, masked, dtype):
    torch.manual_seed(0)
    B, H, D, Dv = 3, 6, 8, 5
    q = torch.randn(B, H, T, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, S, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, S, Dv, dtype=dtype, requires_grad=True)
    mask = None
    if masked:  # a per-row ragged mask: row b sees slots < end_b, causally over the T new tokens
        end = torch.tensor([S, S - 1, S - 2])
        pos = end[:, None] - T + torch.arange(T)  # [B, T]
        mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, S]
    causal = mask is None and T > 1
    got = attend(q, k, v, 0.3, mask)
    want = repeated(q, k, v, 0.3, mask, causal)
    assert got.shape == (B, H, T, Dv)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype,folded", [(torch.float32, True), (torch.bfloat16, False)])
def test_one_token_folds_only_in_fp32(monkeypatch, dtype, folded):
    """A masked decode step of grouped queries: in fp32 SDPA gets the KV heads as they are and the
    query heads as rows, without `enable_gqa` (which sends fp32 to the math kernel, copying K and V per
    query head); in bf16 it keeps the heads and `enable_gqa` (the half-precision kernels' parallelism)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape, kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k = torch.randn(2, 6, 1, 4, dtype=dtype), torch.randn(2, 2, 7, 4, dtype=dtype)
    attend(q, k, k, 0.5, torch.ones(2, 1, 1, 7, dtype=torch.bool))
    want_q = torch.Size([2, 2, 3, 4]) if folded else torch.Size([2, 6, 1, 4])
    assert seen == [(want_q, torch.Size([2, 2, 7, 4]), not folded)]
