"""Output layer + cross-entropy with the gradient computed in the forward pass (eager mode).

The idea is Liger-Kernel's FusedLinearCrossEntropy (Hsu et al. 2024, "Liger Kernel: Efficient
Triton Kernels for LLM Training"): as soon as the logits exist, turn them into the gradient of
the loss w.r.t. themselves, (softmax - onehot) / n_valid, in place, and push it through the two
matmuls (grad_x = G W, grad_W = G^T x). Backward then only scales the stored gradients. Eager
`F.cross_entropy(logits.float())` keeps an fp32 copy of the [N, V] logits, their fp32
log-softmax for backward and an fp32 gradient (~10 GB at 16k tokens x 50k vocabulary); here the
[N, V] logits exist once, in the compute dtype, and turn into their own gradient chunk by chunk.
Under torch.compile the plain composition is returned: inductor fuses it as well (measured).

Legend: N rows (B*T tokens), d model width, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

# One chunk of rows is converted to fp32 at a time: ~2**27 values, 512 MB.
CHUNK_VALUES = 2**27


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: at most ~CHUNK_VALUES logits, split evenly over the chunks (no small
    leftover chunk), a multiple of 8, at most n_rows."""
    n_chunks = -(-n_rows * vocab // CHUNK_VALUES)  # ceil
    rows = -(-n_rows // max(n_chunks, 1))  # ceil
    return max(1, min(n_rows, -(-rows // 8) * 8))


def plain_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100) -> torch.Tensor:
    """The unfused composition: full [N, V] logits, then F.cross_entropy in fp32."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits = x @ weight^T over the targets != ignore_index, as
    `F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)` gives
    (nan when every target is ignored).

    x: [N, d]; weight: [V, d]; targets: [N] long. Returns a scalar fp32 loss. The logits are
    computed in the autocast dtype when autocast is enabled for x's device type, else in x's dtype.
    `chunk_rows` bounds eager mode's fp32 working memory (default: `default_chunk_rows`).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [N, d] and weight [V, d], got {list(x.shape)} and {list(weight.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"targets must be [N] = [{x.shape[0]}], got {list(targets.shape)}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if torch.compiler.is_compiling():
        # inductor already fuses cross-entropy (an online-softmax pass forward, one pass backward) and
        # plans its memory: on an H100 this path was no faster under torch.compile and held 3 GB more
        # at mla-125m's batch (benchmarks/RESULTS.md, 2026-11-25)
        return plain_linear_cross_entropy(x, weight, targets, ignore_index)
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[0], weight.shape[0])
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk_rows, dtype, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int, dtype: torch.dtype, grads: bool) -> torch.Tensor:
        N = x.shape[0]
        w, x_c = weight.to(dtype), x.to(dtype)  # [V, d], [N, d]: cast once, as autocast would
        logits = x_c @ w.t()  # [N, V] in the compute dtype; overwritten by its gradient below
        valid = targets != ignore_index  # [N]
        safe_targets = torch.where(valid, targets, 0)[:, None]  # [N, 1], gatherable
        n_valid = valid.sum()
        # d(mean loss)/d(row loss): 1/n_valid on counted rows, 0 on ignored ones (all 0 if none counts)
        row_scale = (valid.float() / n_valid.clamp(min=1))[:, None]  # [N, 1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, N, chunk_rows):  # trip count depends on shapes only
            rows = slice(start, min(start + chunk_rows, N))
            logp = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)  # [C, V] fp32
            loss_sum = loss_sum - (logp.gather(1, safe_targets[rows]).squeeze(1) * valid[rows]).sum()
            if grads:  # softmax - onehot, scaled, in place: no further [C, V] buffers
                grad = logp.exp_().scatter_add_(1, safe_targets[rows], torch.full_like(logp[:, :1], -1.0))
                logits[rows] = grad.mul_(row_scale[rows])
        if grads:
            ctx.save_for_backward((logits @ w).to(x.dtype) if ctx.needs_input_grad[0] else None,  # grad_x [N, d]
                                  (logits.t() @ x_c).to(weight.dtype) if ctx.needs_input_grad[1] else None)  # grad_W [V, d]
        return loss_sum / n_valid  # nan when n_valid == 0, as F.cross_entropy

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_output if grad_x is not None else None,
                grad_w * grad_output if grad_w is not None else None, None, None, None, None, None)
