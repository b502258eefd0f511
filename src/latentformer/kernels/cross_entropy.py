"""Cross-entropy rows in Triton: per-row loss and, in place, the logits' own gradient.

One program per row of the [N, V] logits (compute dtype, e.g. bf16). Pass 1 streams the row
once for its log-sum-exp (online max and sum, fp32); pass 2 streams it again (a 100 KB row at
V = 50k, partly still in L2) and overwrites it with (softmax - onehot(target)) * scale, where scale
is 1 / n_valid on counted rows and 0 on ignored ones. HBM traffic is one read and one write of
the logits: what `model/loss.py` needs to push the gradient through the output layer's two
matmuls in the forward pass.

Used on CUDA for fp16/bf16/fp32 logits with unit column stride; otherwise loss.py's chunked
torch path runs (it computes the same quantities).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path is used
    triton = None

BLOCK = 4096  # columns per iteration (16 fp32 values per thread at 8 warps)
NUM_WARPS = 8


def supported(logits: torch.Tensor) -> bool:
    return (triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1
            and logits.dtype in (torch.bfloat16, torch.float16, torch.float32))


if triton is not None:

    @triton.jit
    def _rows_kernel(logits, stride_row, targets, row_loss, n_valid, V, V_pad, ignore_index,
                     BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride_row
        target = tl.load(targets + row)
        valid = target != ignore_index
        cols = tl.arange(0, BLOCK)
        # Loads and stores are masked by V_pad (a multiple of 16 when padded: vectorized); the
        # classes past V are masked in registers. Pass 1: log-sum-exp with a scalar running max;
        # the first block always holds a real class, so the running max is finite from then on
        # and masked lanes add exp(-inf) = 0.
        m = float("-inf")
        s = 0.0
        for start in range(0, V_pad, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V_pad, other=0.0).to(tl.float32)
            x = tl.where(c < V, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        in_range = valid & (target >= 0) & (target < V)  # an out-of-range target reads nothing
        x_t = tl.load(base + target, mask=in_range, other=0.0).to(tl.float32)
        tl.store(row_loss + row, tl.where(valid, lse - x_t, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, 1.0 / tl.maximum(tl.load(n_valid).to(tl.float32), 1.0), 0.0)
            n_blocks = tl.cdiv(V_pad, BLOCK)
            for i in range(0, n_blocks):  # backwards: the row's tail was read last, most likely still in L2
                c = (n_blocks - 1 - i) * BLOCK + cols
                x = tl.load(base + c, mask=c < V_pad, other=0.0).to(tl.float32)
                g = tl.where(c < V, tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0), 0.0)
                tl.store(base + c, (g * scale).to(logits.dtype.element_ty), mask=c < V_pad)


def cross_entropy_rows_(logits: torch.Tensor, n_classes: int, targets: torch.Tensor, ignore_index: int,
                        n_valid: torch.Tensor, write_grad: bool, block: int = BLOCK,
                        num_warps: int = NUM_WARPS) -> torch.Tensor:
    """logits: [N, V_pad], the classes in the first n_classes columns, the rest padding (ignored,
    and written as 0 when write_grad); with write_grad overwritten by d(mean loss)/d(logits).
    targets: [N] long; n_valid: 0-dim count of targets != ignore_index (device memory: no host
    sync). Returns the [N] fp32 row losses (0 on ignored rows). block, num_warps: launch
    parameters (benchmarks/cross_entropy.py sweeps them)."""
    N, V_pad = logits.shape
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _rows_kernel[(N,)](logits, logits.stride(0), targets, row_loss, n_valid, n_classes, V_pad, ignore_index,
                           BLOCK=block, WRITE_GRAD=write_grad, num_warps=num_warps)
    return row_loss


# -- the FP8 output layer's variant: the gradient in float8, into its own buffer -----------------
# (rows per program, columns per iteration, warps), timed at the first launch for each padded vocabulary
# (the kernel only reads its input, so trial launches change nothing); the best differs between GPUs
FP8_CONFIGS = ((64, 128, 8), (32, 256, 8), (128, 64, 8), (32, 128, 4))


if triton is not None:

    @triton.jit
    def _rows_fp8_kernel(logits, stride_row, targets, row_loss, grad, N, V, V_pad, ignore_index, grad_scale,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # As _rows_kernel, for a tile of ROWS rows: pass 1 the row losses, pass 2 (softmax - onehot) *
        # grad_scale in float8 into grad [N, V_pad].
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_in = rows < N
        target = tl.load(targets + rows, mask=row_in, other=ignore_index)
        valid = (target != ignore_index) & row_in
        base = logits + rows[:, None].to(tl.int64) * stride_row  # [ROWS, 1] pointers
        cols = tl.arange(0, BLOCK)
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        s = tl.zeros((ROWS,), tl.float32)
        for start in range(0, V_pad, BLOCK):
            c = start + cols
            x = tl.load(base + c[None, :], mask=row_in[:, None] & (c[None, :] < V_pad), other=0.0).to(tl.float32)
            x = tl.where(c[None, :] < V, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m = m_new
        lse = m + tl.log(s)
        in_range = valid & (target >= 0) & (target < V)
        x_t = tl.load(logits + rows.to(tl.int64) * stride_row + target, mask=in_range, other=0.0).to(tl.float32)
        tl.store(row_loss + rows, tl.where(valid, lse - x_t, 0.0), mask=row_in)
        keep = tl.where(valid, grad_scale, 0.0)  # [ROWS]: an ignored row's gradient is 0
        for start in range(0, V_pad, BLOCK):
            c = start + cols
            inside = row_in[:, None] & (c[None, :] < V_pad)
            x = tl.load(base + c[None, :], mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None]) - tl.where(c[None, :] == target[:, None], 1.0, 0.0)
            g = tl.where(c[None, :] < V, g * keep[:, None], 0.0)
            tl.store(grad + rows[:, None].to(tl.int64) * V_pad + c[None, :], g.to(grad.dtype.element_ty), mask=inside)

    _rows_fp8_tuned = triton.autotune([triton.Config({"ROWS": r, "BLOCK": b}, num_warps=w) for r, b, w in FP8_CONFIGS],
                                      key=["V_pad"])(_rows_fp8_kernel)


def cross_entropy_rows_fp8(logits: torch.Tensor, n_classes: int, targets: torch.Tensor, ignore_index: int,
                           grad_scale: float, dtype: torch.dtype, tile_rows: int | None = None,
                           block: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [N, V_pad] as for `cross_entropy_rows_` (read only). Returns (row losses [N] fp32, G [N,
    V_pad]), G = (softmax - onehot) * grad_scale in the float8 `dtype` (0 on ignored rows and padding
    columns). Unlike `cross_entropy_rows_` the gradient is not divided by the count of targets: the
    matmul's scale does it. tile_rows, block, num_warps: launch parameters, all three or none (then
    FP8_CONFIGS' fastest)."""
    N, V_pad = logits.shape
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = torch.empty((N, V_pad), dtype=dtype, device=logits.device)
    if N:
        args = (logits, logits.stride(0), targets, row_loss, grad, N, n_classes, V_pad, ignore_index, grad_scale)
        if tile_rows is None:
            _rows_fp8_tuned[lambda meta: (triton.cdiv(N, meta["ROWS"]),)](*args)
        else:
            _rows_fp8_kernel[(triton.cdiv(N, tile_rows),)](*args, ROWS=tile_rows, BLOCK=block, num_warps=num_warps)
    return row_loss, grad
