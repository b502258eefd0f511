"""Fused output layers + KL(teacher || student): equal to F.kl_div of the two models' full logits."""

import pytest
import torch
import torch.nn.functional as F

from latentformer import Transformer
from latentformer.model.loss import linear_kl_divergence
from latentformer.model.transformer import IGNORE_INDEX

from .helpers import ATTENTION, small
from .test_loss import assert_close

N, D, DT, V = 45, 24, 40, 67


def inputs():
    x = torch.randn(N, D, requires_grad=True)
    w = (0.3 * torch.randn(V, D)).requires_grad_()
    xt, wt = torch.randn(N, DT), 0.3 * torch.randn(V, DT)  # a wider teacher
    t = torch.randint(0, V, (N,))
    t[::4] = IGNORE_INDEX
    return x, w, xt, wt, t


def reference(x, w, xt, wt, t):
    """Mean over the counted rows of sum_v p_t (log p_t - log p_s), from the full fp32 logits."""
    rows = t != IGNORE_INDEX
    logp_s = F.log_softmax(F.linear(x, w).float()[rows], dim=-1)
    logp_t = F.log_softmax(F.linear(xt, wt).float()[rows], dim=-1)
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")


def loss_and_grads(fn, x, w, xt, wt, t):
    loss = fn(x, w, xt, wt, t)
    return (loss.detach(), *torch.autograd.grad(loss, (x, w)))


@pytest.mark.parametrize("chunk_rows", [1, 16, N, None])  # 16 does not divide 45
def test_matches_kl_div_fp32(chunk_rows):
    x, w, xt, wt, t = inputs()
    want = loss_and_grads(reference, x, w, xt, wt, t)
    got = loss_and_grads(lambda *a: linear_kl_divergence(*a, chunk_rows=chunk_rows), x, w, xt, wt, t)
    assert want[0] > 0.1  # the two distributions differ: the check is not of zeros
    for g, r in zip(got, want):
        assert_close(g, r, 1e-5)


def test_bf16_autocast_matches_autocast_reference():
    x, w, xt, wt, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(reference, x, w, xt, wt, t)
        got = loss_and_grads(lambda *a: linear_kl_divergence(*a, chunk_rows=16), x, w, xt, wt, t)
    assert_close(got[0], want[0], 1e-2)
    assert_close(got[1], want[1], 2e-2)
    assert_close(got[2], want[2], 2e-2)


def test_same_distributions_give_zero_loss_and_gradient():
    x, w, _, _, t = inputs()
    loss, gx, gw = loss_and_grads(linear_kl_divergence, x, w, x.detach(), w.detach(), t)
    assert abs(loss.item()) < 1e-6 and gx.abs().max() < 1e-7 and gw.abs().max() < 1e-7


def test_all_rows_ignored_gives_nan_and_zero_grads():
    x, w, xt, wt, _ = inputs()
    loss, gx, gw = loss_and_grads(linear_kl_divergence, x, w, xt, wt, torch.full((N,), IGNORE_INDEX))
    assert loss.isnan() and not gx.any() and not gw.any()


def test_user_errors():
    x, w, xt, wt, t = inputs()
    with pytest.raises(ValueError, match="teacher"):
        linear_kl_divergence(x, w, xt, wt[:-1], t)
    with pytest.raises(ValueError, match="teacher"):
        linear_kl_divergence(x, w, xt[:-1], wt, t)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_kl_divergence(x, w, xt, wt, t, chunk_rows=0)


def models():
    torch.manual_seed(0)
    student = Transformer(small(**ATTENTION["mla"], tie_embeddings=True)).train()
    teacher = Transformer(small(attention="gqa", n_kv_heads=2, d_model=48, n_heads=4)).eval()
    x, y = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    y[0, :7] = IGNORE_INDEX
    return student, teacher, x, y


def test_transformer_distill_loss_equals_logits_path():
    """forward(..., teacher=(final_hidden, lm_head.weight)) == KL of the two models' logits, in the loss
    and in every gradient of the student (an MLA student, a wider GQA teacher)."""
    student, teacher, x, y = models()
    with torch.no_grad():
        soft = (teacher.final_hidden(x), teacher.lm_head.weight)
        logits_t = teacher(x)
    out = student(x, y, teacher=soft)
    got = torch.autograd.grad(out.distill_loss, list(student.parameters()), allow_unused=True)
    rows = y.reshape(-1) != IGNORE_INDEX
    want_loss = F.kl_div(F.log_softmax(student(x).flatten(0, 1)[rows], -1), F.log_softmax(logits_t.flatten(0, 1)[rows], -1),
                         log_target=True, reduction="batchmean")
    want = torch.autograd.grad(want_loss, list(student.parameters()), allow_unused=True)
    assert_close(out.distill_loss.detach(), want_loss.detach(), 1e-5)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if r is not None:
            assert_close(g, r, 1e-4)
    assert_close(out.loss.detach(), student(x, y).loss.detach(), 1e-6)  # the cross-entropy is unchanged


def test_objective_mixes_cross_entropy_and_distillation():
    student, teacher, x, y = models()
    with torch.no_grad():
        out = student(x, y, teacher=(teacher.final_hidden(x), teacher.lm_head.weight))
    assert_close(out.objective(0.3, 0.0), out.loss, 1e-6)
    assert_close(out.objective(0.3, 1.0), out.distill_loss, 1e-6)
    assert_close(out.objective(0.3, 0.25), 0.75 * out.loss + 0.25 * out.distill_loss, 1e-6)
    assert student(x, y).distill_loss is None


def test_pure_distillation_without_the_cross_entropys_gradient_trains_the_same():
    """loss_grad=False (the trainer's choice at distill_weight 1): the same losses and exactly the same
    gradients of objective(.., 1.0), and the cross-entropy carries no gradient (nothing formed for it)."""
    student, teacher, x, y = models()
    with torch.no_grad():
        soft = (teacher.final_hidden(x), teacher.lm_head.weight)
    outs, grads = [], []
    for loss_grad in (True, False):
        out = student(x, y, teacher=soft, loss_grad=loss_grad)
        grads.append(torch.autograd.grad(out.objective(0.3, 1.0), list(student.parameters()), allow_unused=True))
        outs.append(out)
    assert torch.equal(outs[0].loss.detach(), outs[1].loss) and torch.equal(outs[0].distill_loss.detach(), outs[1].distill_loss.detach())
    assert not outs[1].loss.requires_grad
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_token_dropout_refuses_a_teacher():
    student = Transformer(small(token_dropout=0.1)).train()
    x = torch.randint(0, 97, (2, 8))
    with pytest.raises(ValueError, match="token_dropout"):
        student(x, x, teacher=(torch.zeros(2, 8, 32), student.lm_head.weight.detach()))


def test_compiled_distillation_equals_eager():
    student, teacher, x, y = models()
    with torch.no_grad():
        soft = (teacher.final_hidden(x), teacher.lm_head.weight)
    params = list(student.parameters())
    want = student(x, y, teacher=soft).distill_loss
    want_grads = torch.autograd.grad(want, params)
    torch._dynamo.reset()  # shapes compiled by other tests would make this compile dynamic (and the next one's)
    try:
        got = torch.compile(student, fullgraph=True)(x, y, teacher=soft).distill_loss
        got_grads = torch.autograd.grad(got, params)
    finally:
        torch._dynamo.reset()
    assert_close(got.detach(), want.detach(), 1e-5)
    for g, r in zip(got_grads, want_grads):
        assert_close(g, r, 1e-4)
