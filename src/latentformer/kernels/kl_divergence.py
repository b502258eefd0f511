"""KL(teacher || student) rows in Triton: per-row KL and, in place, the student logits' own gradient.

One program per row of the student's and the teacher's [N, V] logits (compute dtype, e.g. bf16).
Pass 1 streams both rows once, in fp32, for both log-sum-exps (online max and sum) and for
A = sum_i exp(t_i - m_t) (t_i - s_i), rescaled as the teacher's running max m_t grows; then
KL(p_t || p_s) = sum_i p_t,i (t_i - s_i) - lse_t + lse_s = A / S_t - lse_t + lse_s, S_t the
teacher's sum. Pass 2 streams both rows again (backwards: the tail read last is the likeliest still
in L2) and overwrites the student's with (softmax(s) - softmax(t)) * scale, scale 1 / n_valid on
counted rows and 0 on ignored ones; the teacher's logits are only read. HBM traffic is about one
read of each logits tensor and one write of the student's: what `model/loss.py`'s distillation op
needs to push the gradient through the student's output layer in the forward pass.

Used on CUDA for fp16/bf16/fp32 logits; otherwise loss.py's chunked torch path runs (it computes
the same quantities).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path is used
    triton = None

BLOCK = 4096  # columns per iteration, of each of the two rows
NUM_WARPS = 8


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `kl_rows_` runs for logits of `dtype` on `device` (it also needs 2-D logits with unit
    column stride, as a matmul gives)."""
    return triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:

    @triton.jit
    def _rows_kernel(logits, stride_row, teacher, stride_teacher, targets, row_kl, n_valid, V, V_pad, ignore_index,
                     BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride_row
        base_t = teacher + row * stride_teacher
        valid = tl.load(targets + row) != ignore_index
        cols = tl.arange(0, BLOCK)
        # Loads and stores are masked by V_pad; the columns past V are masked in registers: -inf for
        # the maxima and exponentials (exp gives 0), and 0 for the difference in A (padding may hold
        # anything; 0 * inf would be nan). The first block always holds a real class, so both running
        # maxima are finite from then on.
        m_s = float("-inf")
        s_s = 0.0
        m_t = float("-inf")
        s_t = 0.0
        a = 0.0
        for start in range(0, V_pad, BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V_pad, other=0.0).to(tl.float32)
            y = tl.load(base_t + c, mask=c < V_pad, other=0.0).to(tl.float32)
            x_masked = tl.where(c < V, x, float("-inf"))
            y_masked = tl.where(c < V, y, float("-inf"))
            m_s_new = tl.maximum(m_s, tl.max(x_masked, 0))
            s_s = s_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(x_masked - m_s_new), 0)
            m_s = m_s_new
            m_t_new = tl.maximum(m_t, tl.max(y_masked, 0))
            rescale = tl.exp(m_t - m_t_new)
            e = tl.exp(y_masked - m_t_new)
            s_t = s_t * rescale + tl.sum(e, 0)
            a = a * rescale + tl.sum(e * tl.where(c < V, y - x, 0.0), 0)
            m_t = m_t_new
        lse_s = m_s + tl.log(s_s)
        lse_t = m_t + tl.log(s_t)
        tl.store(row_kl + row, tl.where(valid, a / s_t - lse_t + lse_s, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, 1.0 / tl.maximum(tl.load(n_valid).to(tl.float32), 1.0), 0.0)
            n_blocks = tl.cdiv(V_pad, BLOCK)
            for i in range(0, n_blocks):  # backwards: the rows' tails were read last, most likely still in L2
                c = (n_blocks - 1 - i) * BLOCK + cols
                x = tl.load(base + c, mask=c < V_pad, other=0.0).to(tl.float32)
                y = tl.load(base_t + c, mask=c < V_pad, other=0.0).to(tl.float32)
                g = tl.where(c < V, tl.exp(x - lse_s) - tl.exp(y - lse_t), 0.0)
                tl.store(base + c, (g * scale).to(logits.dtype.element_ty), mask=c < V_pad)


def kl_rows_(logits: torch.Tensor, teacher_logits: torch.Tensor, n_classes: int, targets: torch.Tensor,
             ignore_index: int, n_valid: torch.Tensor, write_grad: bool, block: int = BLOCK,
             num_warps: int = NUM_WARPS) -> torch.Tensor:
    """logits (the student's), teacher_logits: [N, V_pad], one dtype, unit column stride, the classes
    in the first n_classes columns, the rest padding (ignored). With write_grad the student's logits
    are overwritten by d(mean KL)/d(logits) = (softmax(logits) - softmax(teacher_logits)) / n_valid
    (0 on ignored rows and padding columns); the teacher's are never written. targets: [N] long, only
    which rows count (!= ignore_index); n_valid: 0-dim count of them (device memory: no host sync).
    Returns the [N] fp32 row KL(p_t || p_s) (0 on ignored rows). block, num_warps: launch parameters."""
    N, V_pad = logits.shape
    row_kl = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _rows_kernel[(N,)](logits, logits.stride(0), teacher_logits, teacher_logits.stride(0), targets, row_kl, n_valid,
                           n_classes, V_pad, ignore_index, BLOCK=block, WRITE_GRAD=write_grad, num_warps=num_warps)
    return row_kl
