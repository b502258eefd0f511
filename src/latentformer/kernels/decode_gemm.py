"""Matrix products for decode-sized inputs (a few dozen rows) in Triton.

A decode step multiplies [M, K] activations (M = batch) by [N, K] weights of a few MB, a dozen
times per layer, so each product's fixed cost matters as much as its weight read. Here each
program owns a slab of BLOCK_N weight rows and the whole K loop (the small [M, K] activations
come from L2), and `swiglu` computes silu(x Wg^T) * (x Wu^T) in one pass over both weights:
one launch where the torch path needs two products and an elementwise kernel.

The products before a residual add (attention output, SwiGLU down) are narrow (N = d_model) with
a long K: few programs, each a long serial K loop. Inside torch.compile they split K over several
programs per slab and leave the fp32 partial sums to the residual add's kernel, which inductor
generates with the sum folded in.

Measured on an H200 (2026-11-29; NOTES.md, "Decode"): at 64 rows the
plain products are about as fast as cuBLAS (both far from bandwidth: a few microseconds each,
mostly fixed cost); the fused SwiGLU and the K splits are what shorten the step: mla-125m's
compiled decode step at batch 64 / 8k context 1.148 ms (cuBLAS) -> 1.068 (these kernels, no split)
-> 1.030 ms (with K splits). So the kernels serve MIN_ROWS..MAX_ROWS rows, the measured regime;
smaller batches keep cuBLAS's GEMV-class kernels (not compared).

Used on CUDA for bf16/fp16 with no gradient; otherwise torch's products run. Accumulation is
fp32 and the output is rounded once (the torch path rounds the two products and the activation
separately, so `swiglu` agrees with it to bf16 rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from latentformer.kernels import gpu_limits

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch's products are used
    triton = None

MIN_ROWS, MAX_ROWS = 32, 64


def supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """x [..., K] and weights [N, K] that the kernels take (see the module docstring)."""
    K = x.shape[-1]
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and MIN_ROWS <= x.numel() // max(K, 1) <= MAX_ROWS and K % 16 == 0
            and all(w.dtype == x.dtype and w.shape[1] == K and w.stride(1) == 1 for w in weights)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))))


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    k_splits: int  # programs per weight slab, each over one contiguous share of K (1: no split)


# inductor unrolls a reduction of up to 8 elements (unroll_reductions_threshold) into its consumer's
# kernel, so summing this many partial products costs no kernel of its own
MAX_K_SPLITS = 8


def launch_config(M: int, N: int, K: int, n_weights: int, elem_bytes: int, sms: int, smem: int,
                  split_k: bool = False) -> LaunchConfig:
    """Tiles for [M, K] x [N, K]^T over `n_weights` weights (2 for SwiGLU) on a GPU with `sms`
    multiprocessors and `smem` bytes of shared memory per program. BLOCK_N: 32 weight rows (the
    best of 16/32 measured at mla-125m's shapes), wider only past two programs per
    multiprocessor; BLOCK_K 256 and 3 pipeline stages, fewer where the stages would not fit in
    shared memory (Triton keeps one activation tile and one tile per weight per stage).
    `split_k`: a narrow product (few slabs, long K) of one weight also splits K over up to
    MAX_K_SPLITS programs per slab, up to two programs per multiprocessor, each at least one K tile
    (never SwiGLU's two: SiLU needs the whole sum)."""
    block_m = max(16, 1 << (M - 1).bit_length())  # tl.dot needs >= 16 rows
    block_n = next((b for b in (32, 64) if -(-N // b) <= 2 * sms), 128)
    block_k, stages = 256, 3
    while block_k > K and block_k > 16:
        block_k //= 2

    def need() -> int:
        return stages * (block_m + n_weights * block_n) * block_k * elem_bytes

    while need() > smem and stages > 2:
        stages -= 1
    while need() > smem and block_k > 16:
        block_k //= 2
    k_splits = max(1, min(MAX_K_SPLITS, 2 * sms // -(-N // block_n), K // block_k)) if split_k and n_weights == 1 else 1
    return LaunchConfig(block_m, block_n, block_k, stages, k_splits)


if triton is not None:

    @triton.jit
    def _gemm_kernel(x, w, w2, y, M, N, K, k_chunk, stride_xm, stride_wn, stride_w2n, stride_ym, stride_ys,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr):
        """y[split, :, n-block] = x[:, K share] @ w[n-block, K share]^T over this program's share of K
        (all of it without a split), or silu(x @ w^T) * (x @ w2^T) with GLU."""
        split = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask, n_mask = offs_m < M, offs_n < N
        k_lo = split * k_chunk
        k_hi = tl.minimum(K, k_lo + k_chunk)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            k_mask = (k + offs_k) < k_hi
            a = tl.load(x + offs_m[:, None] * stride_xm + (k + offs_k)[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(w + offs_n[:, None] * stride_wn + (k + offs_k)[None, :],
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, tl.trans(b), acc)
            if GLU:
                b2 = tl.load(w2 + offs_n[:, None] * stride_w2n + (k + offs_k)[None, :],
                             mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                acc2 = tl.dot(a, tl.trans(b2), acc2)
        if GLU:
            acc = acc * tl.sigmoid(acc) * acc2
        tl.store(y + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def _launch(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, split_k: bool = False,
            block_n: int | None = None, block_k: int | None = None, num_stages: int | None = None,
            num_warps: int = 4, k_splits: int | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N]; launch parameters default to `launch_config` for x's GPU. With
    `split_k` (never for SwiGLU) and more than one K split the programs write fp32 partial products
    [splits, M, N] and the result is their sum, rounded once (under torch.compile the sum fuses into
    the consumer of the result); `k_splits` overrides the number of splits there."""
    K, N = x.shape[-1], w.shape[0]
    split_k = split_k and w2 is None  # SiLU needs the whole sum
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    sms, smem_per_sm = gpu_limits(x.device) if x.is_cuda else (132, 228 * 1024)  # else: Triton's CPU interpreter (tests)
    cfg = launch_config(M, N, K, 1 + (w2 is not None), x.element_size(), sms, smem_per_sm - 1024, split_k)  # 1 KB reserved per block
    block_n, block_k = block_n or cfg.block_n, block_k or cfg.block_k
    k_splits = (k_splits or cfg.k_splits) if split_k else 1
    k_chunk = triton.cdiv(triton.cdiv(K, k_splits), block_k) * block_k  # whole K tiles per split
    splits = triton.cdiv(K, k_chunk)
    y = torch.empty(splits, M, N, device=x.device, dtype=x.dtype if splits == 1 else torch.float32)
    w2_ = w2 if w2 is not None else w
    _gemm_kernel[(triton.cdiv(N, block_n), splits)](
        x2, w, w2_, y, M, N, K, k_chunk, x2.stride(0), w.stride(0), w2_.stride(0), y.stride(1), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k, GLU=w2 is not None,
        num_warps=num_warps, num_stages=num_stages or cfg.num_stages)
    y = y[0] if splits == 1 else y.sum(0).to(x.dtype)
    return y.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, w: torch.Tensor, split_k: bool = False, **launch) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N] (= F.linear(x, w)). `split_k`: a narrow product may split
    K over several programs per weight slab; only inside torch.compile, whose kernel for the
    consumer of the result (here the residual add) also sums the partial products, so no kernel is
    added. `launch` (block_n, block_k, num_stages, num_warps, k_splits) overrides the defaults
    for the tuning benchmark."""
    if not supported(x, w):
        return F.linear(x, w)
    return _launch(x, w, None, split_k and torch.compiler.is_compiling(), **launch)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, **launch) -> torch.Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T): x [..., K], weights [N, K] -> [..., N]."""
    if not supported(x, w_gate, w_up):
        return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    return _launch(x, w_gate, w_up, **launch)


__all__ = ["supported", "launch_config", "linear", "swiglu"]
