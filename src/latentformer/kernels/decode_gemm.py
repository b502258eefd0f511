"""Matrix products for decode-sized inputs (a few dozen rows) in Triton.

A decode step multiplies [M, K] activations, M = batch <= 64, by [N, K] weights of a few MB.
The cost is reading the weight once; cuBLAS tiles such products for large M and launches only
N / 128 or so programs (6 for N = 768), too few to draw the GPU's bandwidth, so each product
takes several times its read time. Here every program owns BLOCK_N (16+) weight rows and the
whole K loop, so N / BLOCK_N programs (48-144 at 125M-350M widths) stream the weight at once;
the [M, K] activations are small and come from L2. `swiglu` computes silu(x Wg^T) * (x Wu^T)
in one pass over both weights (one launch instead of two products and an elementwise kernel).

Used on CUDA for bf16/fp16 with M <= MAX_ROWS and no gradient; otherwise torch's products run.
Accumulation is fp32 and the output is rounded once (the unfused torch path rounds the two
products and the activation separately, so `swiglu` agrees with it to bf16 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch's products are used
    triton = None

MAX_ROWS = 64
# Tuning benchmark switch (benchmarks/decode_tuning.py compares the step with and without).
ENABLED = True


def supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """x [..., K] and weights [N, K] that the kernels take (see the module docstring)."""
    K = x.shape[-1]
    return (ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() // max(K, 1) <= MAX_ROWS and K % 16 == 0
            and all(w.dtype == x.dtype and w.shape[1] == K and w.stride(1) == 1 for w in weights)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))))


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


def default_block_n(N: int, sms: int) -> int:
    """The narrowest weight slab (16..128 rows) with at most two programs per multiprocessor."""
    for block_n in (16, 32, 64):
        if -(-N // block_n) <= 2 * sms:
            return block_n
    return 128


def _launch(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, block_n: int | None, block_k: int,
            num_stages: int, num_warps: int) -> torch.Tensor:
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_n = block_n or default_block_n(N, torch.cuda.get_device_properties(x.device).multi_processor_count)
    w2_ = w2 if w2 is not None else w
    _gemm_kernel[(triton.cdiv(N, block_n),)](
        x2, w, w2_, y, M, N, K, x2.stride(0), w.stride(0), w2_.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(K)),
        GLU=w2 is not None, num_warps=num_warps, num_stages=num_stages)
    return y.view(*x.shape[:-1], N)


def linear(x: torch.Tensor, w: torch.Tensor, *, block_n: int | None = None, block_k: int = 256,
           num_stages: int = 3, num_warps: int = 4) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T -> [..., N] (= F.linear(x, w)). Launch parameters are exposed for
    the tuning benchmark; the defaults were chosen with it (benchmarks/decode_tuning.py)."""
    if not supported(x, w):
        return F.linear(x, w)
    return _launch(x, w, None, block_n, block_k, num_stages, num_warps)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *, block_n: int | None = None,
           block_k: int = 256, num_stages: int = 3, num_warps: int = 4) -> torch.Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T): x [..., K], weights [N, K] -> [..., N]."""
    if not supported(x, w_gate, w_up):
        return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    return _launch(x, w_gate, w_up, block_n, block_k, num_stages, num_warps)


__all__ = ["supported", "linear", "swiglu"]
