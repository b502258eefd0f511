"""Fused output layer + cross-entropy: equal to F.cross_entropy(F.linear(x, w)) in loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from latentformer import Transformer
from latentformer.model.loss import default_chunk_rows, linear_cross_entropy
from latentformer.model.transformer import IGNORE_INDEX, ModelOutput

from .helpers import ATTENTION, FFNS, small

N, D, V = 45, 24, 67


def inputs(dtype=torch.float32):
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(V, D, dtype=dtype)).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[::4] = IGNORE_INDEX
    return x, w, t


def loss_and_grads(loss_fn, x, w, t):
    loss = loss_fn(x, w, t)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w)))


def reference(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t, ignore_index=IGNORE_INDEX)


def assert_close(got, want, rel):
    """Max |got - want| within rel x max |want| (elementwise relative error is meaningless near 0)."""
    assert got.dtype == want.dtype
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("chunk_rows", [1, 8, 16, N, 1000, None])  # 16 does not divide 45
def test_matches_cross_entropy_fp32(chunk_rows):
    x, w, t = inputs()
    want = loss_and_grads(reference, x, w, t)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), x, w, t)
    for g, r in zip(got, want):
        assert_close(g, r, 1e-6)


def test_all_targets_ignored_gives_nan_loss_and_zero_grads():
    x, w, _ = inputs()
    t = torch.full((N,), IGNORE_INDEX)
    want = loss_and_grads(reference, x, w, t)
    loss, gx, gw = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), x, w, t)
    assert want[0].isnan() and loss.isnan()
    assert torch.equal(gx, want[1]) and torch.equal(gw, want[2]) and not gx.any() and not gw.any()


def test_bf16_autocast_matches_autocast_reference():
    """Both compute bf16 logits and bf16 gradient matmuls (fp32 softmax): within a few bf16 ulps
    (2**-8 = 0.4%) of the largest value; the loss itself within 1e-3 relative."""
    x, w, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(reference, x, w, t)
        got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), x, w, t)
    assert_close(got[0], want[0], 1e-3)
    assert_close(got[1], want[1], 1e-2)  # grad x: fp32 like x
    assert_close(got[2], want[2], 1e-2)  # grad w: fp32 like w


def test_grad_output_scales_the_gradients():
    x, w, t = inputs()
    (3 * linear_cross_entropy(x, w, t, chunk_rows=16)).backward()
    gx3, gw3 = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    linear_cross_entropy(x, w, t, chunk_rows=16).backward()
    assert_close(gx3, 3 * x.grad, 1e-6)
    assert_close(gw3, 3 * w.grad, 1e-6)


def test_frozen_weight_still_gives_grad_x():
    x, w, t = inputs()
    w.requires_grad_(False)
    (gx,) = torch.autograd.grad(linear_cross_entropy(x, w, t, chunk_rows=16), x)
    (want,) = torch.autograd.grad(reference(x, w, t), x)
    assert_close(gx, want, 1e-6)


def test_no_grad_gives_the_loss_only():
    x, w, t = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, chunk_rows=16)
    assert not loss.requires_grad
    assert_close(loss, reference(x, w, t).detach(), 1e-6)


def test_default_chunks_are_even_bounded_and_multiples_of_8():
    assert default_chunk_rows(16 * 1024, 50304) == 2344  # 7 chunks of <= 2**27 logits, not 6 + a stub
    assert default_chunk_rows(5, 50304) == 5
    assert default_chunk_rows(10**6, 2**30) == 8  # a row exceeds the budget: 8 rows


def test_user_errors():
    x, w, t = inputs()
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(x, w, t, chunk_rows=0)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, w, t[:-1])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(x, w[:, :-1], t)


def train_step(model, x, y, fused: bool = True):
    """(ModelOutput, gradients) of one step; fused=False: the same loss from the full logits."""
    model.zero_grad()
    torch.manual_seed(1)
    if fused:
        out = model(x, y)
    else:
        logits = model(x)
        aux = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
        out = ModelOutput(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX),
                          torch.stack(aux).sum() if aux else None)
    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    loss.backward()
    return out, {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,overrides", [
    ("tied", dict(tie_embeddings=True)),
    ("untied", dict()),
    ("mla-tied", dict(ATTENTION["mla"], tie_embeddings=True)),
    ("mla-moe", dict(ATTENTION["mla-q"], **FFNS["moe"], aux_loss_coef=0.01)),
])
def test_transformer_fused_loss_equals_logits_path(name, overrides):
    model = Transformer(small(**overrides)).train()
    x, y = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    y[0, :7] = IGNORE_INDEX
    want, want_grads = train_step(model, x, y, fused=False)
    got, got_grads = train_step(model, x, y)
    assert_close(got.loss, want.loss, 1e-6)
    if want.aux_loss is not None:
        assert_close(got.aux_loss, want.aux_loss, 1e-6)
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], 1e-5)


def test_compiled_fused_training_step_equals_eager():
    model = Transformer(small(n_layers=1, tie_embeddings=True)).train()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    y[1, :3] = IGNORE_INDEX
    want, want_grads = train_step(model, x, y)
    compiled = torch.compile(model, fullgraph=True)  # no graph break around the autograd.Function
    got, got_grads = train_step(compiled, x, y)
    assert_close(got.loss, want.loss, 1e-5)
    for n in want_grads:
        assert_close(got_grads[n], want_grads[n], 1e-5)


# -- the FP8 output layer (train.fp8_output) ---------------------------------------------------
def float8_reference(x, w, t):
    """The FP8 output layer written out: x and w cast to e4m3 with tensorwise amax scales, logits from
    the dequantized operands, G = softmax - onehot cast to e5m2 at the static scale 2**15, and the two
    gradient matmuls from the dequantized G and operands. Returns (loss, dx, dw)."""
    def quantized(a, dtype, scale):
        return (a * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).float() / scale

    e4m3 = torch.float8_e4m3fn
    xq = quantized(x.detach(), e4m3, 448 / x.detach().abs().max())
    wq = quantized(w.detach(), e4m3, 448 / w.detach().abs().max())
    logits = (xq @ wq.t()).requires_grad_()
    loss = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
    loss.backward()  # logits.grad = softmax - onehot, 0 on ignored rows
    n_valid = (t != IGNORE_INDEX).sum()
    g = quantized(logits.grad, torch.float8_e5m2, 2.0**15) / n_valid
    return loss.detach() / n_valid, g @ wq, g.t() @ xq


def test_fp8_output_layer_is_the_float8_computation_written_out():
    """In fp32 (no autocast) every cast is the reference's, bit for bit: what is left is the order of
    the sums. Some targets are ignored, and the 45 rows are padded to 48 for _scaled_mm."""
    x, w, t = inputs()
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, fp8=True), x, w, t)
    for g, r in zip(got, float8_reference(x, w, t)):
        assert_close(g, r, 1e-5)


def test_fp8_output_layer_is_close_to_bf16():
    """Under bf16 autocast: the loss within 1% and the gradients within 10% of the largest value of
    the exact ones (e5m2 keeps 2 mantissa bits); no grad: the loss alone."""
    x, w, t = inputs()
    want = loss_and_grads(reference, x, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda *a: linear_cross_entropy(*a, fp8=True), x, w, t)
        with torch.no_grad():
            monitor = linear_cross_entropy(x, w, t, fp8=True)
    assert_close(got[0], want[0], 1e-2)
    assert_close(got[1], want[1], 0.1)
    assert_close(got[2], want[2], 0.1)
    assert_close(monitor, got[0], 1e-6)


def test_fp8_output_layer_in_the_model_trains_as_bf16_does():
    """A Transformer whose output layer is in float8 (`fp8_output`, set by train.fp8): same loss
    within 1% at init, and 30 AdamW steps on one batch lower it as far as the plain model's."""
    torch.manual_seed(0)
    x = torch.randint(0, 97, (4, 33))
    losses = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = Transformer(small(init_std=0.1))
        model.fp8_output = fp8
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(30):
            loss = model(x[:, :-1], x[:, 1:]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses.append(curve)
    plain, fp8 = losses
    assert abs(fp8[0] - plain[0]) < 0.01 * plain[0]
    assert plain[-1] < 0.5 * plain[0], "the plain model must learn the batch for the comparison to mean anything"
    assert abs(fp8[-1] - plain[-1]) < 0.05 * plain[0]
