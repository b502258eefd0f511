"""Fused absorbed-MLA decode attention in Triton (flash-decoding: Dao et al. 2023).

One query token per row attends over the cached latent [B, S, r + dr] that all H heads
share. Each program takes one row and one slice of the cache, streams it through SRAM
once (scores against [c_kv, k_pe], an online softmax, and the weighted sum of c_kv), and
writes a partial result; a second small kernel merges the slices. The cache is read
exactly once per step, which is what makes the decode step approach the memory roofline.
The number of valid slots is read from device memory, so one launch configuration serves
every step of a CUDA-graph-captured decode loop (slices past the end exit at once).

Used on CUDA for T == 1 when r and dr are powers of two (>= 16); otherwise the portable
matmul path in attention.py runs.
"""

from __future__ import annotations

import torch

from latentformer.kernels import gpu_limits

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the portable path is used
    triton = None


def supported(latent: torch.Tensor, r: int, dr: int, T: int) -> bool:
    def pow2(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0

    return (triton is not None and latent.is_cuda and T == 1 and pow2(r) and pow2(dr)
            and latent.dtype in (torch.bfloat16, torch.float16))


if triton is not None:

    @triton.jit
    def _decode_kernel(q_lat, q_pe, latent, length, pad, out, m_out, l_out,
                       H, chunk, scale,
                       stride_qb, stride_qh, stride_pb, stride_ph,
                       stride_lb, stride_ls,
                       stride_ob, stride_os, stride_oh,
                       R: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                       HAS_PAD: tl.constexpr):
        b = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        offs_h = tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, R)
        offs_dr = tl.arange(0, DR)
        h_mask = offs_h < H
        ql = tl.load(q_lat + b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :], mask=h_mask[:, None], other=0.0)
        qp = tl.load(q_pe + b * stride_pb + offs_h[:, None] * stride_ph + offs_dr[None, :], mask=h_mask[:, None], other=0.0)
        S = tl.load(length)  # valid slots 0..S-1
        lo = split * chunk
        if HAS_PAD:
            lo = tl.maximum(lo, tl.load(pad + b))  # left padding of this row is never a key
        hi = tl.minimum((split + 1) * chunk, S)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, R], tl.float32)
        base = latent + b * stride_lb
        for start in range(lo, hi, BLOCK_S):
            offs_s = start + tl.arange(0, BLOCK_S)
            s_mask = offs_s < hi
            c = tl.load(base + offs_s[:, None] * stride_ls + offs_r[None, :], mask=s_mask[:, None], other=0.0)
            pe = tl.load(base + offs_s[:, None] * stride_ls + R + offs_dr[None, :], mask=s_mask[:, None], other=0.0)
            s = tl.dot(ql, tl.trans(c)) + tl.dot(qp, tl.trans(pe))  # [BLOCK_H, BLOCK_S] fp32
            # the cast keeps the loop-carried softmax state fp32 when torch.compile passes `scale` as fp64
            s = tl.where(s_mask[None, :], s * scale, float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m_i = m_new
        o_ptr = out + b * stride_ob + split * stride_os + offs_h[:, None] * stride_oh + offs_r[None, :]
        tl.store(o_ptr, acc, mask=h_mask[:, None])
        ml = b * n_splits * H + split * H + offs_h
        tl.store(m_out + ml, m_i, mask=h_mask)
        tl.store(l_out + ml, l_i, mask=h_mask)


    @triton.jit
    def _merge_kernel(out, m_in, l_in, o, n_splits, H, stride_ob, stride_os, stride_oh, R: tl.constexpr):
        """softmax over all keys = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i (empty slices: m = -inf)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_r = tl.arange(0, R)
        m_max = float("-inf")
        for i in range(n_splits):
            m_max = tl.maximum(m_max, tl.load(m_in + (b * n_splits + i) * H + h))
        num = tl.zeros([R], tl.float32)
        den = 0.0
        for i in range(n_splits):
            m_i = tl.load(m_in + (b * n_splits + i) * H + h)
            w = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_max))
            den += w * tl.load(l_in + (b * n_splits + i) * H + h)
            num += w * tl.load(out + b * stride_ob + i * stride_os + h * stride_oh + offs_r)
        tl.store(o + (b * H + h) * R + offs_r, (num / den).to(o.dtype.element_ty))


def default_splits(B: int, S: int, row_bytes: int, sms: int, smem_per_sm: int, block_s: int, num_stages: int) -> int:
    """Cache slices per row: about two programs per SM, but never more programs than fit on the GPU
    at once (each keeps `num_stages` tiles of `block_s` cache rows of `row_bytes` in shared memory),
    since a second wave leaves most SMs idle at the tail; and slices of at least 4 tiles. Measured on
    an H100 (benchmarks/attention_kernels.py --sweep, 2026-11-25): mla-125m at B64/8k 1.29x -> 1.25x
    its roofline, latentformer-348m 1.18x -> 1.15x, against 2 stages and no occupancy cap."""
    resident = sms * max(1, smem_per_sm // (num_stages * block_s * row_bytes))
    return max(1, min(-(-S // (4 * block_s)), -(-2 * sms // B), resident // B))


def latent_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, r: int, scale: float,
                            pad: torch.Tensor | None, length: torch.Tensor | None = None, *,
                            n_splits: int | None = None, num_stages: int = 3, block_s: int | None = None,
                            num_warps: int | None = None) -> torch.Tensor:
    """q_lat [B,H,r], q_pe [B,H,dr], latent [B,S,r+dr] -> o_lat [B,H,r] in q's dtype.

    Keys are slots [pad[b], length) of row b; `length` is a device int scalar (default S).
    `n_splits` (slices of the cache per row), `num_stages` (Triton pipelining depth), `block_s`
    (cache slots per iteration) and `num_warps` are exposed for the tuning benchmark; the
    defaults were chosen with it (benchmarks/attention_kernels.py --sweep)."""
    B, H, _ = q_lat.shape
    S, dr = latent.shape[1], latent.shape[2] - r
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1:  # rows and heads may be strided (views of a projection)
        q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    if length is None:
        length = torch.full((), S, dtype=torch.int32, device=latent.device)
    block_s = block_s or (64 if r <= 256 else 32)
    num_warps = num_warps or (4 if r <= 256 else 8)
    if n_splits is None:
        n_splits = default_splits(B, S, (r + dr) * latent.element_size(), *gpu_limits(latent.device), block_s, num_stages)
    chunk = triton.cdiv(triton.cdiv(S, n_splits), block_s) * block_s
    n_splits = triton.cdiv(S, chunk)
    out = torch.empty(B, n_splits, H, r, device=latent.device, dtype=torch.float32)
    m = torch.empty(B, n_splits, H, device=latent.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _decode_kernel[(B, n_splits)](
        q_lat, q_pe, latent, length, pad if pad is not None else length, out, m, l,
        H, chunk, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent.stride(0), latent.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        R=r, DR=dr, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_S=block_s, HAS_PAD=pad is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    o = torch.empty(B, H, r, device=latent.device, dtype=q_lat.dtype)
    _merge_kernel[(B, H)](out, m, l, o, n_splits, H, out.stride(0), out.stride(1), out.stride(2), R=r, num_warps=1)
    return o


__all__ = ["supported", "latent_decode_attention"]
