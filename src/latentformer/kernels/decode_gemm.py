"""Matrix products for decode-sized inputs (a few dozen rows) in Triton.

A decode step multiplies [M, K] activations (M = batch) by [N, K] weights of a few MB, a dozen
times per layer, so each product's fixed cost matters as much as its weight read. Here each
program owns a slab of BLOCK_N weight rows and the whole K loop (the small [M, K] activations
come from L2), and `swiglu` computes silu(x Wg^T) * (x Wu^T) in one pass over both weights:
one launch where the torch path needs two products and an elementwise kernel.

Measured (benchmarks/decode_tuning.py, H200, 2026-11-29, benchmarks/RESULTS.md): at 64 rows the
plain products are about as fast as cuBLAS (both far from bandwidth: a few microseconds each,
mostly fixed cost) and the fused SwiGLU is what shortens the step: mla-125m's compiled decode
step at batch 64 / 8k context 1.13 -> 1.07 ms (-5%). So the kernels serve MIN_ROWS..MAX_ROWS
rows, the measured regime; smaller batches keep cuBLAS's GEMV-class kernels (not compared).

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


def launch_config(M: int, N: int, K: int, n_weights: int, elem_bytes: int, sms: int, smem: int) -> LaunchConfig:
    """Tiles for [M, K] x [N, K]^T over `n_weights` weights (2 for SwiGLU) on a GPU with `sms`
    multiprocessors and `smem` bytes of shared memory per program. BLOCK_N: 32 weight rows (the
    best of 16/32 measured at mla-125m's shapes), wider only past two programs per
    multiprocessor; BLOCK_K 256 and 3 pipeline stages, fewer where the stages would not fit in
    shared memory (Triton keeps one activation tile and one tile per weight per stage)."""
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
    return LaunchConfig(block_m, block_n, block_k, stages)


if triton is not None:

    @triton.jit
    def _gemm_kernel(x, w, w2, y, M, N, K, stride_xm, stride_wn, stride_w2n, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr):
        """y[:, n-block] = x @ w[n-block]^T, or silu(x @ w^T) * (x @ w2^T) with GLU."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask, n_mask = offs_m < M, offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, K, BLOCK_K):
            k_mask = (k + offs_k) < K
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
        tl.store(y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def _launch(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, block_n: int | None = None,
            block_k: int | None = None, num_stages: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [..., K] -> [..., N]; launch parameters default to `launch_config` for x's GPU."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    sms, smem_per_sm = gpu_limits(x.device) if x.is_cuda else (132, 228 * 1024)  # else: Triton's CPU interpreter (tests)
    cfg = launch_config(M, N, K, 1 + (w2 is not None), x.element_size(), sms, smem_per_sm - 1024)  # 1 KB reserved per block
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_n = block_n or cfg.block_n
    w2_ = w2 if w2 is not None else w
    _gemm_kernel[(triton.cdiv(N, block_n),)](
        x2, w, w2_, y, M, N, K, x2.stride(0), w.stride(0), w2_.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k or cfg.block_k, GLU=w2 is not None,
        num_warps=num_warps, num_stages=num_stages or cfg.num_stages)
    return y.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, w: torch.Tensor, **launch) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N] (= F.linear(x, w)). `launch` (block_n, block_k,
    num_stages, num_warps) overrides the defaults for the tuning benchmark."""
    if not supported(x, w):
        return F.linear(x, w)
    return _launch(x, w, None, **launch)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, **launch) -> torch.Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T): x [..., K], weights [N, K] -> [..., N]."""
    if not supported(x, w_gate, w_up):
        return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    return _launch(x, w_gate, w_up, **launch)


__all__ = ["supported", "launch_config", "linear", "swiglu"]
