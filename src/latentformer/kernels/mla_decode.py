"""Fused absorbed-MLA decode attention in Triton (flash-decoding: Dao et al. 2023).

One query token per row attends over the cached latent [B, S, r + dr] that all H heads
share. Each program takes one row and one slice of the cache, streams it through SRAM
once (scores against [c_kv, k_pe], an online softmax, and the weighted sum of c_kv), and
writes a partial result. The last program of a row to finish (an arrival counter per row,
which that program sets back to 0) merges the row's partial results: one launch per step,
no separate merge kernel. The cache is read exactly once per step, which is what makes the
decode step approach the memory roofline. Each row's number of valid slots is read from device
memory, so one launch configuration serves every step of a CUDA-graph-captured decode loop
(slices past the end exit at once).

With `new` (the model's path), the kernel also does the step's work on the new token that would
otherwise be four small kernels per layer: it rotates the query's rope part, and the program whose
slice holds the new slot normalizes the new latent (kv_a_norm), rotates its rope key, writes both
to the cache and adds that key to its softmax from registers (it never reads the slot back).
Measured against the same step with the new token finished by torch ops (H200, 2026-11-29): mla-125m's
compiled decode step at batch 64 / 8k context 136 -> 91 kernels, 1.102 -> 1.020 ms (-7.4%);
latentformer-348m 1.634 -> 1.548 ms (-5.3%). Timed alone, the new-token work adds about 0.4 us per
launch (NOTES.md, "Decode").

Used on CUDA for T == 1 when r and dr are powers of two (>= 16); otherwise the portable
matmul path of the decode layer (infer/decode.py, `latent_attention`) runs.
"""

from __future__ import annotations

from typing import NamedTuple

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


class NewToken(NamedTuple):
    """The new token's raw latent and rope key, for the kernel to finish and cache (see the module docstring).

    kv [B, r + dr]: [c_kv, k_pe] as projected (before kv_a_norm and rope; rows may be strided);
    norm_weight [r] and eps: kv_a_norm (RMSNorm), or None (kv_latent_norm off: the latent is cached as
    projected); cos/sin [B|1, dr/2]: the token's rope angles;
    interleave: rope pairs (x0, x1), (x2, x3)... in, de-interleaved out (as model/rope.py)."""

    kv: torch.Tensor
    norm_weight: torch.Tensor | None
    eps: float
    cos: torch.Tensor
    sin: torch.Tensor
    interleave: bool


if triton is not None:

    @triton.jit
    def _rope_pairs(DR: tl.constexpr, INTERLEAVE: tl.constexpr):
        """For output element j of a rotated vector: out[j] = x[ia] cos[j % DR/2] + sign x[ib] sin[j % DR/2]."""
        HALF: tl.constexpr = DR // 2
        j = tl.arange(0, DR)
        lower = j < HALF
        k = tl.where(lower, j, j - HALF)
        if INTERLEAVE:
            ia = tl.where(lower, 2 * k, 2 * k + 1)
            ib = tl.where(lower, 2 * k + 1, 2 * k)
        else:
            ia = j
            ib = tl.where(lower, j + HALF, j - HALF)
        return ia, ib, k, tl.where(lower, -1.0, 1.0)

    @triton.jit
    def _decode_kernel(q_lat, q_pe, latent, length, pad, part, m_part, l_part, arrivals, o,
                       new, norm_w, cos, sin, eps,
                       H, chunk, scale, stride_len,
                       stride_qb, stride_qh, stride_pb, stride_ph,
                       stride_lb, stride_ls,
                       stride_ob, stride_os, stride_oh,
                       stride_nb, stride_cb,
                       R: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                       HAS_PAD: tl.constexpr, NEW: tl.constexpr, INTERLEAVE: tl.constexpr, NORM: tl.constexpr):
        b = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        offs_h = tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, R)
        offs_dr = tl.arange(0, DR)
        h_mask = offs_h < H
        ql = tl.load(q_lat + b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :], mask=h_mask[:, None], other=0.0)
        q_row = q_pe + b * stride_pb + offs_h[:, None] * stride_ph
        S = tl.load(length + b * stride_len)  # valid slots 0..S-1 of this row
        lo = split * chunk
        if HAS_PAD:
            lo = tl.maximum(lo, tl.load(pad + b))  # left padding of this row is never a key
        hi = tl.minimum((split + 1) * chunk, S)
        if NEW:  # rotate the query's rope part (fp32, rounded like model/rope.py); slot S - 1 is added after the loop
            ia, ib, k, sign = _rope_pairs(DR, INTERLEAVE)
            cs = tl.load(cos + b * stride_cb + k)
            sn = tl.load(sin + b * stride_cb + k)
            qa = tl.load(q_row + ia[None, :], mask=h_mask[:, None], other=0.0)
            qb = tl.load(q_row + ib[None, :], mask=h_mask[:, None], other=0.0).to(tl.float32)
            qp = (qa.to(tl.float32) * cs[None, :] + sign[None, :] * qb * sn[None, :]).to(qa.dtype)
            hi = tl.minimum(hi, S - 1)
        else:  # the cache holds the new token and q_pe is rotated
            qp = tl.load(q_row + offs_dr[None, :], mask=h_mask[:, None], other=0.0)
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
        if NEW:
            if (S - 1) // chunk == split:  # this slice holds the new slot: finish the token, cache it, attend to it
                kv = new + b * stride_nb
                c_raw = tl.load(kv + offs_r)  # rounded where model/norm.py and model/rope.py round
                if NORM:
                    c_f = c_raw.to(tl.float32)
                    c_new = (c_f * tl.rsqrt(tl.sum(c_f * c_f, 0) / R + eps)).to(c_raw.dtype)
                    c_new = (tl.load(norm_w + offs_r).to(tl.float32) * c_new.to(tl.float32)).to(latent.dtype.element_ty)
                else:
                    c_new = c_raw.to(latent.dtype.element_ty)
                pe_a = tl.load(kv + R + ia)
                pe_new = (pe_a.to(tl.float32) * cs + sign * tl.load(kv + R + ib).to(tl.float32) * sn).to(pe_a.dtype)
                pe_new = pe_new.to(latent.dtype.element_ty)
                slot = base + (S - 1) * stride_ls
                tl.store(slot + offs_r, c_new)
                tl.store(slot + R + offs_dr, pe_new)
                c_cached = c_new.to(tl.float32)  # the key and value as cached (rounded)
                s_new = (tl.sum(ql.to(tl.float32) * c_cached[None, :], 1) + tl.sum(qp.to(tl.float32) * pe_new.to(tl.float32)[None, :], 1))
                s_new = (s_new * scale).to(tl.float32)
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp(m_i - m_new)
                p_new = tl.exp(s_new - m_new)
                l_i = l_i * alpha + p_new
                acc = acc * alpha[:, None] + p_new[:, None] * c_cached[None, :]
                m_i = m_new
        row = part + b * stride_ob + offs_h[:, None] * stride_oh + offs_r[None, :]
        tl.store(row + split * stride_os, acc, mask=h_mask[:, None])
        ml = b * n_splits * H + offs_h  # m_part, l_part: [B, n_splits, H]
        tl.store(m_part + ml + split * H, m_i, mask=h_mask)
        tl.store(l_part + ml + split * H, l_i, mask=h_mask)
        # Merge: softmax over all keys = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i (an empty
        # slice has m = -inf). The barrier orders every thread's stores before the counter's release;
        # the program that sees n_splits - 1 arrivals is the row's last and acquires them all.
        tl.debug_barrier()
        if tl.atomic_add(arrivals + b, 1, sem="acq_rel") == n_splits - 1:
            tl.store(arrivals + b, 0)  # re-armed for the next launch
            m_run = tl.full([BLOCK_H], float("-inf"), tl.float32)
            den = tl.zeros([BLOCK_H], tl.float32)
            num = tl.zeros([BLOCK_H, R], tl.float32)
            for i in range(n_splits):  # .cg: read the other programs' results from L2, never a stale L1 line
                m_s = tl.load(m_part + ml + i * H, mask=h_mask, other=float("-inf"), cache_modifier=".cg")
                m_new = tl.maximum(m_run, m_s)
                alpha = tl.where(m_run == float("-inf"), 0.0, tl.exp(m_run - m_new))
                w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_new))
                den = den * alpha + w * tl.load(l_part + ml + i * H, mask=h_mask, other=0.0, cache_modifier=".cg")
                num = num * alpha[:, None] + w[:, None] * tl.load(row + i * stride_os, mask=h_mask[:, None], other=0.0,
                                                                  cache_modifier=".cg")
                m_run = m_new
            tl.store(o + (b * H + offs_h[:, None]) * R + offs_r[None, :], (num / den[:, None]).to(o.dtype.element_ty),
                     mask=h_mask[:, None])


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
                            num_warps: int | None = None, arrivals: torch.Tensor | None = None,
                            new: NewToken | None = None) -> torch.Tensor:
    """q_lat [B,H,r], q_pe [B,H,dr], latent [B,S,r+dr] -> o_lat [B,H,r] in q's dtype.

    Keys are slots [pad[b], length[b]) of row b; `length` is a device int tensor [B], or a scalar
    for every row (default S).
    Without `new`, q_pe is rotated and the cache already holds the new token. With `new`, q_pe is
    as projected, and the kernel writes the finished token to slot length - 1 (see `NewToken`).
    `arrivals`: int32 zeros [>= B], the kernel's per-row counter, left at zero after each call (a
    caller that decodes step after step keeps one, e.g. `Decoder.arrivals`, so no step has to
    zero a new one; default: a new one per call). One launch at a time may use a given counter.
    `n_splits` (slices of the cache per row), `num_stages` (Triton pipelining depth), `block_s`
    (cache slots per iteration) and `num_warps` are exposed for the tuning benchmark; the
    defaults were chosen with it (benchmarks/attention_kernels.py --sweep)."""
    B, H, _ = q_lat.shape
    S, dr = latent.shape[1], latent.shape[2] - r
    if arrivals is not None and (arrivals.dtype != torch.int32 or arrivals.numel() < B or arrivals.device != latent.device):
        raise ValueError(f"arrivals must be int32 zeros with at least {B} entries on {latent.device}")
    if new is not None and (new.cos.shape != new.sin.shape or new.cos.shape[-1] * 2 != dr):
        raise ValueError(f"cos and sin must both be [B|1, {dr // 2}], got {list(new.cos.shape)} and {list(new.sin.shape)}")
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
    if arrivals is None:
        arrivals = torch.zeros(B, device=latent.device, dtype=torch.int32)
    part = torch.empty(B, n_splits, H, r, device=latent.device, dtype=torch.float32)
    m = torch.empty(B, n_splits, H, device=latent.device, dtype=torch.float32)
    l = torch.empty_like(m)
    o = torch.empty(B, H, r, device=latent.device, dtype=q_lat.dtype)
    if new is None:  # the kernel ignores its new-token arguments: any pointers will do
        new_args, stride_nb, stride_cb = (o, o, o, o, 0.0), 0, 0
    else:
        kv = new.kv if new.kv.stride(-1) == 1 else new.kv.contiguous()  # rows may stay strided
        cos, sin = new.cos.contiguous(), new.sin.contiguous()  # one row stride serves both
        norm_w = kv if new.norm_weight is None else new.norm_weight.contiguous()  # unread without the norm
        new_args, stride_nb = (kv, norm_w, cos, sin, new.eps), kv.stride(0)
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0  # one row of angles for every row: stride 0
    _decode_kernel[(B, n_splits)](
        q_lat, q_pe, latent, length, pad if pad is not None else length, part, m, l, arrivals, o, *new_args,
        H, chunk, scale, length.stride(0) if length.dim() else 0,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent.stride(0), latent.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        stride_nb, stride_cb,
        R=r, DR=dr, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_S=block_s, HAS_PAD=pad is not None,
        NEW=new is not None, INTERLEAVE=new is not None and new.interleave,
        NORM=new is not None and new.norm_weight is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o


__all__ = ["NewToken", "supported", "latent_decode_attention"]
