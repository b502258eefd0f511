"""Kernel checks run under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton
is imported, so test_interpreted.py runs each check in a fresh process). Each check compares a
kernel with a plain torch reference and raises AssertionError on a mismatch."""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

from latentformer.kernels import decode_gemm
from latentformer.kernels.cross_entropy import cross_entropy_rows_
from latentformer.kernels.kl_divergence import kl_rows_
from latentformer.kernels.mla_decode import latent_decode_attention


def check_cross_entropy() -> None:
    torch.manual_seed(0)
    # (rows, classes, padded width, dtype, columns per iteration): padding, one and several blocks, fp16/bf16/fp32
    for N, V, Vp, dtype, block in [(7, 100, 128, torch.float32, 32), (5, 300, 300, torch.bfloat16, 128),
                                   (6, 1000, 1024, torch.bfloat16, 256), (3, 513, 576, torch.float16, 512)]:
        logits = torch.zeros(N, Vp, dtype=dtype)
        logits[:, :V] = (3 * torch.randn(N, V)).to(dtype)
        t = torch.randint(0, V, (N,))
        t[1] = -100
        n_valid = (t != -100).sum()
        ref = logits[:, :V].float().requires_grad_()
        ref_rows = F.cross_entropy(ref, t, ignore_index=-100, reduction="none")
        ref_rows.sum().div(n_valid).backward()
        work = logits.clone()
        rows = cross_entropy_rows_(work, V, t, -100, n_valid, True, block=block, num_warps=1)
        torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-5, atol=1e-5)
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # one rounding to dtype
        torch.testing.assert_close(work[:, :V].float(), ref.grad, rtol=0, atol=tol)
        assert not work[:, V:].any(), "padding columns must be written as 0"
        assert not work[1].any(), "an ignored row has no gradient"
        untouched = logits.clone()
        torch.testing.assert_close(cross_entropy_rows_(untouched, V, t, -100, n_valid, False, block=block, num_warps=1), rows)
        assert torch.equal(untouched, logits), "write_grad=False must not modify the logits"


def fp8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """got: a float8 tensor from a kernel, want: the fp32 values it should hold. Triton's interpreter
    rounds to float8 with two bugs of its own: a mantissa that rounds up to the next power of two does
    not carry into the exponent, and subnormals flush to 0. So entries equal torch's cast wherever
    that cast is a normal number and not a power of two, and elsewhere lie within half of |want| (or
    the smallest normal). The GPU check (benchmarks/cross_entropy.py --fp8) wants every entry equal."""
    tiny = torch.finfo(got.dtype).smallest_normal
    cast = want.to(got.dtype)
    err = (got.float() - want).abs()
    assert (err <= 0.5 * want.abs() + tiny).all(), f"largest error {err.max():.3g}"
    mantissa = torch.frexp(cast.float().abs())[0]
    exact = (cast.float().abs() >= tiny) & (mantissa != 0.5)  # normal and not a power of two
    assert exact.sum() > 0.5 * (want != 0).sum(), "the check needs entries to check"
    assert torch.equal(got.view(torch.uint8)[exact], cast.view(torch.uint8)[exact]), "an entry differs from torch's cast"


def fp8_values(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """[M, K] of `dtype`'s finite values, every exponent and sign (random bytes, NaN/inf bytes dropped)."""
    raw = torch.randint(0, 256, (M, K), dtype=torch.uint8).view(dtype)
    return torch.where(raw.float().isfinite(), raw.float(), 0.0).to(dtype)


def check_fp8_cross_entropy() -> None:
    """The FP8 output layer's rows kernel: the row losses as cross_entropy_rows_'s, and (softmax -
    onehot) * scale in e5m2; the float8 cast in both layouts."""
    from latentformer.kernels import float8
    from latentformer.kernels.cross_entropy import cross_entropy_rows_fp8

    torch.manual_seed(0)
    S = 2.0**15
    # (rows, classes, padded width, rows per program, columns per iteration): a partial row tile,
    # padding, one and several column blocks
    for N, V, Vp, tile, block in [(7, 100, 128, 4, 32), (16, 300, 320, 8, 64), (21, 1000, 1024, 16, 256)]:
        logits = torch.zeros(N, Vp, dtype=torch.bfloat16)
        logits[:, :V] = (3 * torch.randn(N, V)).bfloat16()
        t = torch.randint(0, V, (N,))
        t[1] = -100
        ref = logits[:, :V].float().requires_grad_()
        ref_rows = F.cross_entropy(ref, t, ignore_index=-100, reduction="none")
        ref_rows.sum().backward()
        before = logits.clone()
        rows, g = cross_entropy_rows_fp8(logits, V, t, -100, S, torch.float8_e5m2, tile_rows=tile, block=block,
                                         num_warps=1)
        assert torch.equal(logits, before), "the logits are read only"
        torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-5, atol=1e-5)
        fp8_close(g, F.pad(ref.grad * S, (0, Vp - V)))  # 0 on the ignored row and the padding columns
    for M, K, tile in [(5, 40, 16), (70, 33, 32)]:  # partial tiles, strided rows
        x = torch.randn(M, 2 * K)[:, :K].bfloat16()
        scale = float8.scale_of(x, torch.float8_e4m3fn)
        assert torch.isclose(scale, 448 / x.float().abs().max())
        q, q_t = float8.cast(x, scale, torch.float8_e4m3fn, rows=True, cols=True, tile=tile, num_warps=1)
        fp8_close(q, x.float() * scale)
        assert torch.equal(q_t.view(torch.uint8), q.t().contiguous().view(torch.uint8))
        only_t = float8.cast(x, scale, torch.float8_e4m3fn, rows=False, cols=True, tile=tile, num_warps=1)
        assert only_t[0] is None and torch.equal(only_t[1].view(torch.uint8), q_t.view(torch.uint8))
        # the weight gradient's G^T: an e5m2 matrix transposed by the same kernel at scale 1, bit for bit
        g = fp8_values(M, K, torch.float8_e5m2)
        g_t = float8.transpose(g, tile=tile, num_warps=1)
        assert torch.equal(g_t.view(torch.uint8), g.t().contiguous().view(torch.uint8))


def check_kl_divergence() -> None:
    torch.manual_seed(0)
    # (rows, classes, padded width, dtype, columns per iteration): padding, one and several blocks, fp16/bf16/fp32
    for N, V, Vp, dtype, block in [(7, 100, 128, torch.float32, 32), (5, 300, 300, torch.bfloat16, 128),
                                   (6, 1000, 1024, torch.bfloat16, 256), (3, 513, 576, torch.float16, 512),
                                   (4, 200, 256, torch.float32, 256)]:
        logits, teacher = torch.zeros(N, Vp, dtype=dtype), torch.zeros(N, Vp, dtype=dtype)
        logits[:, :V] = (3 * torch.randn(N, V)).to(dtype)
        teacher[:, :V] = (3 * torch.randn(N, V)).to(dtype)
        logits[:, V:], teacher[:, V:] = float("inf"), float("-inf")  # padding is ignored, whatever it holds
        teacher[2, :V] = (teacher[2, :V].float() - 30).to(dtype)
        teacher[2, V - 1] = 30  # a very peaked teacher, its peak in the last block: the running max rescales A
        t = torch.randint(0, V, (N,))
        t[1] = -100
        n_valid = (t != -100).sum()
        ref = logits[:, :V].float().requires_grad_()
        ref_rows = F.kl_div(F.log_softmax(ref, 1), F.log_softmax(teacher[:, :V].float(), 1), log_target=True,
                            reduction="none").sum(1) * (t != -100)
        ref_rows.sum().div(n_valid).backward()
        work, teacher_before = logits.clone(), teacher.clone()
        rows = kl_rows_(work, teacher, V, t, -100, n_valid, True, block=block, num_warps=1)
        torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-5, atol=1e-5)
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # one rounding to dtype
        torch.testing.assert_close(work[:, :V].float(), ref.grad, rtol=0, atol=tol)
        assert not work[:, V:].any(), "padding columns must be written as 0"
        assert not work[1].any(), "an ignored row has no gradient"
        assert torch.equal(teacher, teacher_before), "the teacher's logits are never written"
        untouched = logits.clone()
        torch.testing.assert_close(kl_rows_(untouched, teacher, V, t, -100, n_valid, False, block=block, num_warps=1), rows)
        assert torch.equal(untouched, logits), "write_grad=False must not modify the logits"


def check_kl_divergence_op() -> None:
    """`linear_kl_divergence` through the kernel == its chunked torch path (loss, both gradients), padded
    vocabulary and an ignored row. The interpreter stands in for the GPU: the kernel is allowed on CPU tensors."""
    from latentformer.kernels import kl_divergence
    from latentformer.model.loss import linear_kl_divergence

    torch.manual_seed(0)
    N, D, DT, V = 21, 24, 40, 100  # V pads to 128
    x, w = torch.randn(N, D, requires_grad=True), (0.3 * torch.randn(V, D)).requires_grad_()
    xt, wt = torch.randn(N, DT), 0.3 * torch.randn(V, DT)
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    results, launches, kernel = [], [], kl_divergence.kl_rows_

    def small_blocks(*args, **kw):  # several blocks per row at this vocabulary
        launches.append(args[0].shape)
        return kernel(*args, **kw, block=32, num_warps=1)

    kl_divergence.kl_rows_ = small_blocks
    for kernel_on in (False, True):
        kl_divergence.supported = lambda device, dtype: kernel_on
        loss = linear_kl_divergence(x, w, xt, wt, t, chunk_rows=8)
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, w))))
    assert launches == [(N, 128)], "the kernel path must run once, on the padded logits"
    assert results[0][0] > 0.1  # the two distributions differ: the check is not of zeros
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def check_decode() -> None:
    torch.manual_seed(0)
    B, H, r, dr, S, scale = 3, 5, 32, 16, 150, 0.2
    q_lat, q_pe = torch.randn(B, H, r), torch.randn(B, H, dr)
    latent = torch.randn(B, S, r + dr)
    pad = torch.tensor([0, 9, 40], dtype=torch.int32)
    arrivals = torch.zeros(B, dtype=torch.int32)  # one counter for every call: each must leave it at zero
    # one length for every row, or each row its own (a ragged cache); several slices, some of them empty
    for length, n_splits in itertools.product((torch.tensor(137), torch.tensor([137, 41, 150])), (1, 3, 7)):
        got = latent_decode_attention(q_lat, q_pe, latent, r, scale, pad, length, n_splits=n_splits, num_stages=1,
                                      block_s=16, num_warps=1, arrivals=arrivals)
        assert not arrivals.any(), "the last program of each row must re-arm its counter"
        for b in range(B):
            keys = latent[b, pad[b]:length.expand(B)[b]]  # [S_b, r+dr]
            p = torch.softmax((keys[:, :r] @ q_lat[b].T + keys[:, r:] @ q_pe[b].T) * scale, dim=0)  # [S_b, H]
            torch.testing.assert_close(got[b], p.T @ keys[:, :r], rtol=1e-4, atol=1e-5)


def check_decode_new_token() -> None:
    """With `new`, the kernel finishes the new token (kv_a_norm, rope) as the model does, writes it to
    slot length - 1 and attends to it; the query's rope part is rotated in the kernel. Without a norm
    weight (kv_latent_norm off) the latent is cached as projected."""
    from latentformer.kernels.mla_decode import NewToken
    from latentformer.model.norm import RMSNorm
    from latentformer.model.rope import apply_rope

    torch.manual_seed(1)
    B, H, r, dr, S, scale = 3, 5, 32, 16, 150, 0.2
    norm = RMSNorm(r, eps=1e-5)
    norm.weight.data = torch.rand(r) + 0.5
    length, pad = torch.tensor(121, dtype=torch.int32), torch.tensor([0, 9, 40], dtype=torch.int32)
    for interleave, rows, normed in ((False, B, True), (True, 1, True), (False, B, False)):  # cos/sin per row or broadcast
        q_lat, q_pe = torch.randn(B, H, r), torch.randn(B, H, dr)
        kv = torch.randn(B, 2 * (r + dr))[:, : r + dr]  # strided rows, like a view of the projection
        angles = torch.rand(rows, dr // 2) * 6
        cos, sin = angles.cos(), angles.sin()
        latent = torch.randn(B, S, r + dr)
        want = latent.clone()
        c_new = norm(kv[:, :r]) if normed else kv[:, :r]
        want[:, length - 1] = torch.cat((c_new, apply_rope(kv[:, None, None, r:], cos[:, None], sin[:, None],
                                                           interleave)[:, 0, 0]), dim=-1).detach()
        q_rot = apply_rope(q_pe[:, None], cos[:, None], sin[:, None], interleave)[:, 0]  # [B, H, dr]
        for n_splits in (1, 4):
            got_cache = latent.clone()
            got = latent_decode_attention(q_lat, q_pe, got_cache, r, scale, pad, length, n_splits=n_splits, num_stages=1,
                                          block_s=16, num_warps=1,
                                          new=NewToken(kv, norm.weight.detach() if normed else None, norm.eps, cos, sin, interleave))
            torch.testing.assert_close(got_cache, want, rtol=1e-5, atol=1e-5)  # only slot length - 1 changed
            for b in range(B):
                keys = want[b, pad[b]:length]
                p = torch.softmax((keys[:, :r] @ q_lat[b].T + keys[:, r:] @ q_rot[b].T) * scale, dim=0)
                torch.testing.assert_close(got[b], p.T @ keys[:, :r], rtol=1e-4, atol=1e-5)


def check_decode_model() -> None:
    """The decode layer's absorbed path through the kernel (kv_a_norm, rope and the cache write done in
    the kernel) == naive decode, with dynamic and static caches, left padding, interleaved rope,
    q_lora and the identity latent norm (kv_latent_norm off). The interpreter stands in for the GPU: the kernel is allowed on CPU tensors, on a 3-SM 'GPU'."""
    from latentformer import Transformer
    from latentformer.infer.decode import Decoder
    from latentformer.kernels import mla_decode
    from tests.model.helpers import small

    kernel, fused = mla_decode.latent_decode_attention, []

    def small_slices(*args, **kw):  # 16-slot tiles: up to 3 slices per row at these lengths
        fused.append(kw.get("new") is not None)
        return kernel(*args, **kw, n_splits=3, block_s=16, num_stages=1, num_warps=1)

    mla_decode.latent_decode_attention = small_slices
    mla_decode.supported = lambda latent, r, dr, T: T == 1
    shape = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=12, qk_rope_head_dim=16, v_head_dim=10,
                 max_seq_len=48, init_std=0.2)
    x = torch.randint(0, 97, (2, 44))
    for extra in ({}, {"rope_interleave": True, "q_lora_rank": 20}, {"kv_latent_norm": False}):
        torch.manual_seed(0)
        model = Transformer(small(**shape, **extra)).eval()
        for static in (False, True):
            outs, caches, decoders = [], [], []
            for impl in ("absorb", "naive"):
                cache = model.make_cache(2, 48)
                cache.set_left_padding([5, 0])
                decoder = Decoder(model, cache, impl, static=static)
                with torch.no_grad():
                    logits = [model(x[:, :12], cache=cache)]
                    logits += [decoder(x[:, t:t + 1]) for t in range(12, 44)]
                outs.append(torch.cat(logits, 1))
                caches.append(cache)
                decoders.append(decoder)
            err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
            assert err < 1e-4, f"{extra} static={static}: absorbed (kernel) vs naive decode logits differ by {err:.1e}"
            for a, n in zip(caches[0].layers, caches[1].layers):  # the kernel wrote the same cache entries
                torch.testing.assert_close(a[0][:, :44], n[0][:, :44], rtol=1e-5, atol=1e-5)
            assert not decoders[0].arrivals.any()
    assert fused and all(fused), "every decode step must take the kernel's new-token path"


def check_decode_gemm() -> None:
    torch.manual_seed(0)
    # (rows, K, N, block_n, block_k): partial row/column/K tiles, one and several K steps, strided rows
    for M, K, N, block_n, block_k in [(1, 48, 40, 16, 32), (5, 96, 64, 32, 64), (17, 160, 100, 16, 64), (64, 64, 33, 16, 64)]:
        x = torch.randn(M, 2 * K)[:, :K]  # rows strided like a view of a wider projection
        w, w2 = torch.randn(N, K), torch.randn(N, K)
        y = decode_gemm._launch(x, w, None, block_n=block_n, block_k=block_k, num_stages=1, num_warps=1)
        torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)
        for k_splits in (2, 3):  # K split over programs (the last share may be a partial tile), partial sums added
            y = decode_gemm._launch(x, w, None, True, block_n=block_n, block_k=block_k, num_stages=1, num_warps=1,
                                    k_splits=k_splits)
            torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)
        y = decode_gemm._launch(x.view(1, M, 1, K), w, w2, block_n=block_n, block_k=block_k, num_stages=1, num_warps=1)
        torch.testing.assert_close(y.reshape(M, N), F.silu(x @ w.T) * (x @ w2.T), rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    {"cross_entropy": check_cross_entropy, "fp8_cross_entropy": check_fp8_cross_entropy, "kl_divergence": check_kl_divergence,
     "kl_divergence_op": check_kl_divergence_op, "decode": check_decode, "decode_new_token": check_decode_new_token,
     "decode_model": check_decode_model,
     "decode_gemm": check_decode_gemm}[sys.argv[1]]()
