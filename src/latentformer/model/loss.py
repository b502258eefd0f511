"""Output layer + cross-entropy with the gradient computed in the forward pass.

The idea is Liger-Kernel's FusedLinearCrossEntropy (Hsu et al. 2024, "Liger Kernel: Efficient
Triton Kernels for LLM Training"): as soon as the logits exist, turn them into the gradient of
the loss w.r.t. themselves, (softmax - onehot) / n_valid, in place, and push it through the two
matmuls (grad_x = G W, grad_W = G^T x). Backward then only scales the stored gradients. Eager
`F.cross_entropy(logits.float())` keeps an fp32 copy of the [N, V] logits, their fp32
log-softmax for backward and an fp32 gradient (~10 GB at 16k tokens x 50k vocabulary); here the
[N, V] logits exist once, in the compute dtype. On CUDA one Triton kernel reads them once for
the loss and overwrites them with their gradient (kernels/cross_entropy.py); elsewhere a torch
path does the same chunk by chunk, on the rows that have a target only (fine-tuning on chat data
ignores the prompt's rows, often most of them; finding them needs their count on the host, free on a
CPU but a synchronization on a GPU, where every row goes through). The whole computation is one
custom op, opaque to torch.compile, so eager and compiled training run the same code.
Distillation's KL(teacher || student) works the same way (`linear_kl_divergence`); on CUDA its
kernel (kernels/kl_divergence.py) reads both models' logits once and overwrites the student's.

With `fp8` (`train.fp8_output`) the three matmuls run on the FP8 tensor cores (`torch._scaled_mm`):
x and W in e4m3 with tensorwise amax scales (torchao's `tensorwise` recipe; kernels/float8.py casts
each once into the layouts its matmuls need), and the gradient G in e5m2 with a static scale. A
softmax minus a one-hot lies in [-1, 1], so G * 2**15 fits e5m2's range (57,344) without an amax
pass: the kernel that forms G writes it straight to float8, and 1 / (2**15 n_valid) goes in the
matmul's scale. The weight gradient's matmul reduces over the tokens, so it takes a transposed copy
of G from `float8.transpose`, the cast kernel at scale 1 (a transposed store from the rows kernel
wrote wrong bytes on an H100, and torch's copy of a transposed 1-byte tensor is slow: NOTES). On a CPU
the same casts run in torch (`torch._scaled_mm` takes float8 there too).

Legend: N rows (B*T tokens), d model width, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from latentformer.kernels import cross_entropy, float8, kl_divergence

# Pad the vocabulary dimension of the logits to a multiple of this (16-byte aligned rows, whole tiles).
VOCAB_ALIGN = 64
# One chunk of rows is converted to fp32 at a time: ~2**27 values, 512 MB.
CHUNK_VALUES = 2**27
# FP8 output layer (module doc): the static scale of the logits' gradient, |softmax - onehot| <= 1
FP8_GRAD_SCALE = 2.0**15
# FP8 output layer: whether the forward's logits come from the FP8 matmul too, or stay bf16 (NOTES)
FP8_LOGITS = True


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
                         ignore_index: int = -100, chunk_rows: int | None = None, fp8: bool = False) -> torch.Tensor:
    """Mean cross-entropy of logits = x @ weight^T over the targets != ignore_index, as
    `F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)` gives
    (nan when every target is ignored).

    x: [N, d]; weight: [V, d]; targets: [N] long. Returns a scalar fp32 loss. The logits are
    computed in the autocast dtype when autocast is enabled for x's device type, else in x's dtype.
    `chunk_rows` bounds the torch path's fp32 working memory (default: `default_chunk_rows`);
    on CUDA the Triton kernel needs none. `fp8`: the matmuls in float8 (module doc).
    """
    loss, _, _ = _fused_linear_cross_entropy(x, weight, targets, ignore_index, fp8,
                                             *_op_arguments(x, weight, targets, chunk_rows))
    return loss


def _op_arguments(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  chunk_rows: int | None) -> tuple[int, torch.dtype, bool, bool]:
    """A fused op's checked shapes -> its last arguments: (chunk_rows, compute dtype (autocast's when
    enabled for x's device, else x's), grad_x, grad_w)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [N, d] and weight [V, d], got {list(x.shape)} and {list(weight.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"targets must be [N] = [{x.shape[0]}], got {list(targets.shape)}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    grad_enabled = torch.is_grad_enabled()
    return (chunk_rows or default_chunk_rows(x.shape[0], weight.shape[0]), dtype,
            grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad)


def _rows_(logits: torch.Tensor, n_classes: int, targets: torch.Tensor, ignore_index: int,
           n_valid: torch.Tensor, write_grad: bool, chunk_rows: int) -> torch.Tensor:
    """Sum of the row losses of logits [N, Vp] (classes in the first n_classes columns, zero
    padding after); with write_grad the logits are overwritten by d(mean loss)/d(logits) =
    (softmax - onehot) / n_valid (0 on ignored rows and padding columns)."""
    if cross_entropy.supported(logits):
        return cross_entropy.cross_entropy_rows_(logits, n_classes, targets, ignore_index, n_valid, write_grad).sum()
    logits = logits[:, :n_classes]
    valid = targets != ignore_index  # [N]
    safe_targets = torch.where(valid, targets, 0)[:, None]  # [N, 1], gatherable
    row_scale = (valid.float() / n_valid.clamp(min=1))[:, None]  # [N, 1]
    loss_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):  # trip count depends on shapes only
        rows = slice(start, min(start + chunk_rows, logits.shape[0]))
        logp = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)  # [C, V] fp32
        loss_sum = loss_sum - (logp.gather(1, safe_targets[rows]).squeeze(1) * valid[rows]).sum()
        if write_grad:  # softmax - onehot, scaled, in place: no further [C, V] buffers
            grad = logp.exp_().scatter_add_(1, safe_targets[rows], torch.full_like(logp[:, :1], -1.0))
            logits[rows] = grad.mul_(row_scale[rows])
    return loss_sum


@torch.library.custom_op("latentformer::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int, fp8: bool, chunk_rows: int, dtype: torch.dtype,
                                grad_x: bool, grad_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, d loss/dx [N, d] or [0], d loss/dW [V, d] or [0]).

    One opaque op, so torch.compile keeps its memory plan: the [N, V] logits exist once, in the
    compute dtype, and become their own gradient before the two gradient matmuls (with `fp8`: are
    read once more into the gradient in float8, module doc)."""
    V = weight.shape[0]
    x_c = x.to(dtype)  # [N, d]: cast once, as autocast would
    w = _padded_rows(weight, dtype)  # [Vp, d]
    valid = targets != ignore_index  # [N]
    n_valid = valid.sum()
    # [n] (module doc); FP8 keeps every row, as on a GPU: its scales are the amax of the whole of x
    rows = valid.nonzero().squeeze(1) if x.device.type == "cpu" and not fp8 and not bool(valid.all()) else None
    if rows is not None:
        x_c, targets = x_c[rows], targets[rows]
    if fp8:
        loss, dx, dw = _fp8_output_layer(x_c, w, V, targets, ignore_index, n_valid, grad_x, grad_w, chunk_rows,
                                         x.dtype, weight.dtype)
        dx = dx if grad_x else x.new_empty(0)  # outputs may not alias: two empties
        dw = dw[:V] if grad_w else x.new_empty(0)
    else:
        logits = x_c @ w.t()  # [N or n, Vp]; the padding columns are 0 and stay 0
        loss = _rows_(logits, V, targets, ignore_index, n_valid, grad_x or grad_w, chunk_rows) / n_valid
        dx, dw = _linear_grads(logits, x_c, w, x, weight, grad_x, grad_w)  # an ignored row's dx is 0
    if grad_x and rows is not None:
        dx = x.new_zeros(x.shape).index_copy_(0, rows, dx)
    return loss, dx, dw  # loss: nan when n_valid == 0, as F.cross_entropy


def _fp8_output_layer(x_c: torch.Tensor, w: torch.Tensor, V: int, targets: torch.Tensor, ignore_index: int,
                      n_valid: torch.Tensor, grad_x: bool, grad_w: bool, chunk_rows: int, dx_dtype: torch.dtype,
                      dw_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, dx [n, d] in dx_dtype, dW [Vp, d] in dw_dtype), each empty where not wanted, the
    matmuls in float8 (module doc). x_c [n, d], w [Vp, d]: the operands in the compute dtype."""
    n = x_c.shape[0]
    pad = -n % 16  # _scaled_mm's dimensions are multiples of 16: zero rows, targets ignored
    if pad:
        x_c, targets = F.pad(x_c, (0, 0, 0, pad)), F.pad(targets, (0, pad), value=ignore_index)
    e4m3 = torch.float8_e4m3fn
    sx, sw = float8.scale_of(x_c, e4m3), float8.scale_of(w, e4m3)
    x8, x8_t = float8.cast(x_c, sx, e4m3, rows=FP8_LOGITS, cols=grad_w)  # [n, d], [d, n]
    w8, w8_t = float8.cast(w, sw, e4m3, rows=FP8_LOGITS, cols=grad_x)  # [Vp, d], [d, Vp]
    if FP8_LOGITS:  # fast accumulation in the forward only, as torchao's tensorwise recipe
        logits = torch._scaled_mm(x8, w8.t(), scale_a=1 / sx, scale_b=1 / sw, out_dtype=x_c.dtype, use_fast_accum=True)
    else:
        logits = x_c @ w.t()  # [n, Vp]
    empty = x_c.new_empty(0)
    if not (grad_x or grad_w):
        return _rows_(logits, V, targets, ignore_index, n_valid, False, chunk_rows) / n_valid, empty, empty
    loss_sum, g8 = _fp8_grad(logits, V, targets, ignore_index, n_valid, chunk_rows)
    del logits
    g8_t = float8.transpose(g8) if grad_w else None  # [Vp, n]: the weight gradient reduces over the rows
    sg = 1 / (FP8_GRAD_SCALE * n_valid.clamp(min=1).float())
    dx = torch._scaled_mm(g8, w8_t.t(), scale_a=sg, scale_b=1 / sw, out_dtype=dx_dtype)[:n] if grad_x else empty
    dw = torch._scaled_mm(g8_t, x8_t.t(), scale_a=sg, scale_b=1 / sx, out_dtype=dw_dtype) if grad_w else empty
    return loss_sum / n_valid, dx, dw


def _fp8_grad(logits: torch.Tensor, V: int, targets: torch.Tensor, ignore_index: int, n_valid: torch.Tensor,
              chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, G [n, Vp]): G = (softmax - onehot) * FP8_GRAD_SCALE in e5m2, 0 on ignored rows. On
    CUDA one kernel reads the logits and writes G; elsewhere the torch path forms the gradient in
    place and casts it."""
    if cross_entropy.supported(logits):
        row_loss, g8 = cross_entropy.cross_entropy_rows_fp8(logits, V, targets, ignore_index, FP8_GRAD_SCALE,
                                                            torch.float8_e5m2)
        return row_loss.sum(), g8
    loss_sum = _rows_(logits, V, targets, ignore_index, n_valid.new_ones(()), True, chunk_rows)  # G, in place
    g8, _ = float8.cast(logits, torch.tensor(FP8_GRAD_SCALE), torch.float8_e5m2, rows=True, cols=False)
    return loss_sum, g8


def _linear_grads(grad_logits: torch.Tensor, x_c: torch.Tensor, w: torch.Tensor, x: torch.Tensor,
                  weight: torch.Tensor, grad_x: bool, grad_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An output layer's gradients from its logits' gradient G [n, Vp] (x_c [n, d] and w [Vp, d] its
    operands in the compute dtype, weight [V, d] unpadded): (G w [n, d] in x's dtype, (G^T x_c)[:V]
    in weight's dtype), each an empty tensor where not wanted (outputs may not alias: two empties)."""
    return ((grad_logits @ w).to(x.dtype) if grad_x else x.new_empty(0),
            (grad_logits.t() @ x_c)[:weight.shape[0]].to(weight.dtype) if grad_w else x.new_empty(0))


def _padded_rows(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [V, d] in `dtype`, with zero rows up to a multiple of VOCAB_ALIGN: cuBLAS falls back to
    unaligned kernels (~5x slower on an H100) when the logits' row stride is odd (GPT-2's 50257).
    torch.compile pads such matmuls itself, but this op is opaque to it."""
    V = weight.shape[0]
    Vp = -(-V // VOCAB_ALIGN) * VOCAB_ALIGN
    if Vp == V:
        return weight.to(dtype)
    w = weight.new_zeros((Vp, weight.shape[1]), dtype=dtype)
    w[:V] = weight
    return w


def _fake_outputs(x: torch.Tensor, weight: torch.Tensor, grad_x: bool, grad_w: bool) -> tuple[torch.Tensor, ...]:
    """The shapes of a fused op's (loss, dx, dW) for torch.compile."""
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape) if grad_x else x.new_empty(0),
            weight.new_empty(weight.shape) if grad_w else x.new_empty(0))


def _register_autograd(op, n_inputs: int) -> None:
    """A fused op's backward: its outputs (loss, dx, dW) hold the gradients of its first two inputs
    (x, weight), formed in the forward; its last two inputs say which exist. Backward scales them."""

    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(output[1], output[2])
        ctx.grad_x, ctx.grad_w = inputs[-2], inputs[-1]

    def backward(ctx: FunctionCtx, grad_loss: torch.Tensor, _gx: torch.Tensor, _gw: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_loss if ctx.grad_x else None, grad_w * grad_loss if ctx.grad_w else None,
                *[None] * (n_inputs - 2))

    op.register_autograd(backward, setup_context=setup_context)


_fused_linear_cross_entropy.register_fake(
    lambda x, weight, targets, ignore_index, fp8, chunk_rows, dtype, grad_x, grad_w: _fake_outputs(x, weight, grad_x, grad_w))
_register_autograd(_fused_linear_cross_entropy, 9)


# -- distillation: KL(teacher || student) through both output layers ---------------------------
def linear_kl_divergence(x: torch.Tensor, weight: torch.Tensor, x_t: torch.Tensor, weight_t: torch.Tensor,
                         targets: torch.Tensor, ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean over the rows whose target != ignore_index of KL(p_t || p_s), p_s = softmax(x @ weight^T)
    (the student) and p_t = softmax(x_t @ weight_t^T) (the teacher, no gradient): Hinton et al.'s
    distillation loss at temperature 1, as Minitron heals pruned models with.

    x: [N, d]; weight: [V, d]; x_t: [N, d_t]; weight_t: [V, d_t]; targets: [N] long (only which rows
    count). Returns a scalar fp32 loss (nan when every row is ignored). As `linear_cross_entropy`: the
    gradient d loss / d student logits = (p_s - p_t) / n_valid is formed in the forward pass. On CUDA
    the Triton kernel does it on both models' full [N, V] logits in the compute dtype; elsewhere the
    torch path goes chunk by chunk (`chunk_rows`, default `default_chunk_rows`): no [N, V] tensor
    exists, of either model."""
    arguments = _op_arguments(x, weight, targets, chunk_rows)
    if x_t.shape[0] != x.shape[0] or weight_t.shape != (weight.shape[0], x_t.shape[1]):
        raise ValueError(f"the teacher's x_t must be [{x.shape[0]}, d_t] and weight_t [{weight.shape[0]}, d_t], "
                         f"got {list(x_t.shape)} and {list(weight_t.shape)}")
    loss, _, _ = _fused_linear_kl(x, weight, x_t.detach(), weight_t.detach(), targets, ignore_index, *arguments)
    return loss


@torch.library.custom_op("latentformer::fused_linear_kl", mutates_args=())
def _fused_linear_kl(x: torch.Tensor, weight: torch.Tensor, x_t: torch.Tensor, weight_t: torch.Tensor,
                     targets: torch.Tensor, ignore_index: int, chunk_rows: int, dtype: torch.dtype,
                     grad_x: bool, grad_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean KL, d loss/dx [N, d] or [0], d loss/dW [V, d] or [0]); one opaque op, as the cross-entropy's.
    On CUDA the kernel reads each model's [N, Vp] logits once and overwrites the student's with their
    gradient; elsewhere chunks of C rows go through fp32 torch ops."""
    V = weight.shape[0]
    x_c, xt_c = x.to(dtype), x_t.to(dtype)  # [N, d], [N, d_t]
    w, wt = _padded_rows(weight, dtype), _padded_rows(weight_t, dtype)  # [Vp, d], [Vp, d_t]
    valid = targets != ignore_index  # [N]
    n_valid = valid.sum()
    if kl_divergence.supported(x.device, dtype):
        logits = x_c @ w.t()  # [N, Vp]; the padding columns are 0
        row_kl = kl_divergence.kl_rows_(logits, xt_c @ wt.t(), V, targets, ignore_index, n_valid, grad_x or grad_w)
        return (row_kl.sum() / n_valid, *_linear_grads(logits, x_c, w, x, weight, grad_x, grad_w))
    row_scale = (valid.float() / n_valid.clamp(min=1))[:, None]  # [N, 1]
    loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = torch.zeros_like(x_c) if grad_x else x.new_empty(0)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if grad_w else x.new_empty(0)
    for start in range(0, x.shape[0], chunk_rows):  # trip count depends on shapes only
        rows = slice(start, min(start + chunk_rows, x.shape[0]))
        logp_s = torch.log_softmax((x_c[rows] @ w.t())[:, :V], dim=-1, dtype=torch.float32)  # [C, V]
        logp_t = torch.log_softmax((xt_c[rows] @ wt.t())[:, :V], dim=-1, dtype=torch.float32)  # [C, V]
        p_t = logp_t.exp()
        loss_sum = loss_sum + ((p_t * (logp_t - logp_s)).sum(1) * valid[rows]).sum()
        if grad_x or grad_w:  # (p_s - p_t) / n_valid, padded back to Vp columns (zeros)
            grad = torch.nn.functional.pad(logp_s.exp_().sub_(p_t).mul_(row_scale[rows]), (0, w.shape[0] - V)).to(dtype)
            if grad_x:
                dx[rows] = grad @ w
            if grad_w:
                dw += grad.t() @ x_c[rows]
    return (loss_sum / n_valid, dx.to(x.dtype) if grad_x else dx,
            dw[:V].to(weight.dtype) if grad_w else dw)


_fused_linear_kl.register_fake(lambda x, weight, x_t, weight_t, targets, ignore_index, chunk_rows, dtype, grad_x, grad_w:
                               _fake_outputs(x, weight, grad_x, grad_w))
_register_autograd(_fused_linear_kl, 10)
