"""Tensorwise float8 casts for the FP8 output layer (model/loss.py).

`torch._scaled_mm` takes its first operand row-major and its second column-major, both contiguous
along the reduced dimension. The output layer reduces over d in the forward and the input
gradient, and over the tokens in the weight gradient, so x [N, d] and W [V, d] are each needed in
float8 in both layouts. One Triton pass reads a bf16 matrix once and writes either layout or both;
at scale 1 it also transposes the float8 logits' gradient for the weight gradient (exactly).
Scales are tensorwise from the amax (torchao's `tensorwise` recipe): float8 value = clamp(value *
scale), and `_scaled_mm` multiplies its result by the two inverse scales.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: torch casts
    triton = None

TILE = 64  # rows and columns per program
# `transpose`'s tile: on [65536, 50304] in e5m2 (H100), 128 x 128 ran in 2.32 ms, 64 x 64 in 2.89
TRANSPOSE_TILE = 128


def max_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def scale_of(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 0-dim fp32 scale that maps t's largest magnitude to `dtype`'s largest finite value
    (device memory: no host sync)."""
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32)
    return max_value(dtype) / amax.clamp(min=1e-12)


def supported(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and t.dim() == 2 and t.stride(1) == 1


def cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: bool, cols: bool,
         tile: int = TILE, num_warps: int = 4) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """t [M, K] (unit column stride) -> (clamp(t * scale) [M, K] in `dtype` if `rows`, its transpose
    [K, M] contiguous if `cols`); a layout not asked for is None. scale: 0-dim fp32 tensor."""
    M, K = t.shape
    if not supported(t):
        q = (t.float() * scale).clamp(-max_value(dtype), max_value(dtype)).to(dtype)
        return (q if rows else None), (q.t().contiguous() if cols else None)
    out = torch.empty((M, K), dtype=dtype, device=t.device) if rows else None
    out_t = torch.empty((K, M), dtype=dtype, device=t.device) if cols else None
    if M and K and (rows or cols):
        _cast_kernel[(triton.cdiv(M, tile), triton.cdiv(K, tile))](
            t, t.stride(0), out if rows else out_t, out_t if cols else out, scale, M, K, max_value(dtype),
            ROWS=rows, COLS=cols, TILE=tile, num_warps=num_warps)
    return out, out_t


def transpose(t: torch.Tensor, tile: int = TRANSPOSE_TILE, num_warps: int = 4) -> torch.Tensor:
    """t [M, K] of finite float8 values -> its transpose [K, M] contiguous, bit for bit: `cast` at scale
    1 (float8 -> fp32 -> float8 is exact). torch's copy of a transposed 1-byte tensor runs far below
    the memory bandwidth (benchmarks/cross_entropy.py --fp8)."""
    return cast(t, torch.ones((), device=t.device), t.dtype, rows=False, cols=True, tile=tile, num_warps=num_warps)[1]


if triton is not None:

    @triton.jit
    def _cast_kernel(src, stride_src, dst, dst_t, scale, M, K, fmax, ROWS: tl.constexpr, COLS: tl.constexpr,
                     TILE: tl.constexpr):
        rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
        cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(src + rows[:, None].to(tl.int64) * stride_src + cols[None, :], mask=mask, other=0.0)
        q = tl.minimum(tl.maximum(x.to(tl.float32) * tl.load(scale), -fmax), fmax)
        if ROWS:
            tl.store(dst + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(dst.dtype.element_ty), mask=mask)
        if COLS:  # transposed in fp32, then cast: [TILE (columns), TILE (rows)]
            q_t = tl.trans(q).to(dst_t.dtype.element_ty)
            tl.store(dst_t + cols[:, None].to(tl.int64) * M + rows[None, :], q_t,
                     mask=(cols[:, None] < K) & (rows[None, :] < M))
