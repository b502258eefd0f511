"""GPU: check and time the fused output layer + cross-entropy against the plain composition.

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/cross_entropy.py [--tokens 65536 --vocab 50257,50304]
For each token count N and vocabulary V (d = 1280: latentformer-348m's output layer; GPT-2's 50257
is what training on GPT-2 tokens uses, 50304 its multiple of 64; bf16 autocast):
1. numerics: the Triton rows kernel's loss and in-place gradient against F.cross_entropy on the
   same bf16 logits (fp32), and `linear_cross_entropy`'s loss and gradients against the plain
   composition;
2. time (median, CUDA events via triton's do_bench) of forward + backward of the output layer and
   loss: plain composition eager and compiled (what inductor makes of it), `linear_cross_entropy`
   eager and compiled, and the rows kernel alone against its roofline (one read and one write of
   the logits at the measured copy bandwidth; `--sweep`: at other launch parameters too).
   Prints a table; no assertion on time.
`--fp8`: instead, the FP8 output layer (`linear_cross_entropy(..., fp8=True)`, train.fp8_output): its
kernels against torch (the float8 cast bitwise; the float8 gradient against F.cross_entropy's), the
op's loss and gradients against the bf16 op, and the fwd+bwd time of the bf16 op, the FP8 op and the
FP8 op with bf16 logits (FP8 gradients only); the ratio column then compares with the bf16 op; and
the weight gradient's transposition of G by `float8.transpose` and by torch, against their roofline.
`--kl`: instead, distillation's `linear_kl_divergence` (a teacher of width d too) through its Triton
kernel against its chunked torch path: the two paths' loss and gradients, and their fwd+bwd time
and peak memory (the ratio column then compares with the torch path).
"""

from __future__ import annotations

import argparse
import itertools
from unittest import mock

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from latentformer.kernels import float8, kl_divergence
from latentformer.kernels.cross_entropy import BLOCK, NUM_WARPS, cross_entropy_rows_, cross_entropy_rows_fp8
from latentformer.model import loss as loss_module
from latentformer.model.loss import VOCAB_ALIGN, linear_cross_entropy, linear_kl_divergence, plain_linear_cross_entropy

D = 1280
SWEEP = ((2048, 8), (8192, 16), (4096, 32), (8192, 32), (16384, 32))  # (columns per iteration, warps)


def bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)  # read + write


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def padded_copy(t: torch.Tensor) -> torch.Tensor:
    """t [N, V] copied into the first V columns of a zeroed [N, Vp] buffer: the layout the op gives the kernel."""
    Vp = -(-t.shape[1] // VOCAB_ALIGN) * VOCAB_ALIGN
    out = t.new_zeros(t.shape[0], Vp)
    out[:, : t.shape[1]] = t
    return out


def fwd_bwd(fn, x, w, t):
    def step():
        x.grad = w.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, w, t)
        loss.backward()
        return loss
    return step


def kl_rows(N: int, V: int, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> list[tuple]:
    """--kl: table rows of linear_kl_divergence fwd+bwd, Triton kernel vs chunked torch path (also checked)."""
    xt, wt = torch.randn_like(x), 0.02 * torch.randn_like(w)
    step, times, grads = fwd_bwd(lambda x, w, t: linear_kl_divergence(x, w, xt, wt, t), x, w, t), {}, {}
    for name, on in (("KL, chunked torch", False), ("KL, Triton kernel", True)):
        with mock.patch.object(kl_divergence, "supported", lambda device, dtype: on):
            grads[name] = (step().detach(), x.grad.clone(), w.grad.clone())
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times[name] = (do_bench(step, warmup=5, rep=50, return_mode="median"),
                           (torch.cuda.max_memory_allocated() - base) / 1e9)
    err = [max_rel(g, p) for g, p in zip(grads["KL, Triton kernel"], grads["KL, chunked torch"])]
    print(f"N={N} V={V}: KL kernel vs torch path: loss {err[0]:.1e}, grad x {err[1]:.1e}, grad W {err[2]:.1e}")
    return [(N, V, name, f"{ms:.2f}", f"{times['KL, chunked torch'][0] / ms:.2f}x", f"{gb:.1f}")
            for name, (ms, gb) in times.items()]


def fp8_rows(N: int, V: int, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, bw: float) -> list[tuple]:
    """--fp8: check the FP8 output layer's kernels and op, then time it against the bf16 op."""
    e4m3, e5m2, S = torch.float8_e4m3fn, torch.float8_e5m2, loss_module.FP8_GRAD_SCALE
    xb = x.detach().bfloat16()
    scale = float8.scale_of(xb, e4m3)
    q, q_t = float8.cast(xb, scale, e4m3, rows=True, cols=True)
    want = (xb.float() * scale).clamp(-448, 448).to(e4m3)
    cast_ok = (torch.equal(q.view(torch.uint8), want.view(torch.uint8))
               and torch.equal(q_t.view(torch.uint8), want.t().contiguous().view(torch.uint8)))
    logits = padded_copy(xb @ w.detach().bfloat16().t())  # [N, Vp]
    rows_loss, g8 = cross_entropy_rows_fp8(logits, V, t, -100, S, e5m2)
    n = 8192  # the reference in fp32 for the first n rows (memory)
    ref = logits[:n, :V].float().requires_grad_()
    ref_rows = F.cross_entropy(ref, t[:n], ignore_index=-100, reduction="none")
    ref_rows.sum().backward()  # softmax - onehot, 0 on ignored rows
    loss_err = max_rel(rows_loss[:n], ref_rows.detach())
    want_g = (ref.grad * S).to(e5m2)
    same = (g8[:n, :V].view(torch.uint8) == want_g.view(torch.uint8)).sum().item() / want_g.numel()
    g_err = max_rel(g8[:n, :V].float() / S, ref.grad)
    del ref, ref_rows, want_g, g8, logits
    grads, times = {}, {}
    variants = (("bf16 op", False, True), ("fp8 op", True, True), ("fp8 op, bf16 logits", True, False))
    for name, fp8, logits_fp8 in variants:
        with mock.patch.object(loss_module, "FP8_LOGITS", logits_fp8):
            step = fwd_bwd(lambda x, w, t: linear_cross_entropy(x, w, t, fp8=fp8), x, w, t)
            grads[name] = (step().detach(), x.grad.clone(), w.grad.clone())
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times[name] = (do_bench(step, warmup=5, rep=50, return_mode="median"),
                           (torch.cuda.max_memory_allocated() - base) / 1e9)
    print(f"N={N} V={V}: float8 cast == torch's: {cast_ok}; fp8 rows kernel: loss {loss_err:.1e} of max, gradient "
          f"{same:.4%} of entries == torch's e5m2 cast, {g_err:.1e} of max from fp32")
    for name, _, _ in variants[1:]:
        err = [max_rel(g, p) for g, p in zip(grads[name], grads["bf16 op"])]
        print(f"N={N} V={V}: {name} vs bf16 op: loss {err[0]:.1e}, grad x {err[1]:.1e}, grad W {err[2]:.1e}")
    n_valid = (t != -100).sum()
    logits = torch.randn(N, -(-V // VOCAB_ALIGN) * VOCAB_ALIGN, device="cuda", dtype=torch.bfloat16)
    kernel_ms = do_bench(lambda: cross_entropy_rows_fp8(logits, V, t, -100, S, e5m2), warmup=5, rep=50,
                         return_mode="median")
    roof_ms = (2 * 2 + 1) * logits.numel() / bw * 1e3  # two reads in bf16, one write in float8
    _, g8 = cross_entropy_rows_fp8(logits, V, t, -100, S, e5m2)
    del logits
    same_t = torch.equal(float8.transpose(g8).view(torch.uint8), g8.t().contiguous().view(torch.uint8))
    print(f"N={N} V={V}: G^T by float8.transpose == torch's transposed copy: {same_t}")
    t_roof_ms = 2 * g8.numel() / bw * 1e3  # one read and one write of G, one byte each
    transposes = [(f"G^T, float8.transpose ({float8.TRANSPOSE_TILE}-wide tiles)", lambda: float8.transpose(g8)),
                  ("G^T, torch's g.t().contiguous()", lambda: g8.t().contiguous())]
    return [(N, V, name, f"{ms:.2f}", f"{times['bf16 op'][0] / ms:.2f}x", f"{gb:.1f}") for name, (ms, gb) in times.items()] + [
        (N, V, "fp8 rows kernel only", f"{kernel_ms:.2f}", f"{kernel_ms / roof_ms:.2f}x roofline", "")] + [
        (N, V, name, f"{ms:.2f}", f"{ms / t_roof_ms:.2f}x roofline", "")
        for name, fn in transposes for ms in [do_bench(fn, warmup=5, rep=50, return_mode="median")]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="65536", help="comma-separated token counts N")
    ap.add_argument("--sweep", action="store_true", help="also time the rows kernel at other launch parameters")
    ap.add_argument("--vocab", default="50257,50304", help="comma-separated vocabulary sizes V")
    ap.add_argument("--kl", action="store_true", help="time linear_kl_divergence's kernel vs its torch path instead")
    ap.add_argument("--fp8", action="store_true", help="check and time the FP8 output layer against the bf16 op instead")
    args = ap.parse_args()
    bw = bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for N, V in itertools.product(map(int, args.tokens.split(",")), map(int, args.vocab.split(","))):
        torch.manual_seed(0)
        x = torch.randn(N, D, device="cuda", requires_grad=True)
        w = (0.02 * torch.randn(V, D, device="cuda")).requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda")
        t[::7] = -100
        if args.kl or args.fp8:
            rows += kl_rows(N, V, x, w, t) if args.kl else fp8_rows(N, V, x, w, t, bw)
            continue

        # 1. numerics: kernel vs F.cross_entropy on the same bf16 logits
        logits = padded_copy(x.detach().bfloat16() @ w.detach().bfloat16().t())  # [N, Vp]
        ref = logits[:, :V].float().requires_grad_()
        ref_loss = F.cross_entropy(ref, t, ignore_index=-100)
        ref_loss.backward()
        work = padded_copy(logits)
        got_loss = cross_entropy_rows_(work, V, t, -100, (t != -100).sum(), True).sum() / (t != -100).sum()
        assert not work[:, V:].any(), "padding columns must stay 0"
        kernel_err = (abs(got_loss.item() - ref_loss.item()) / ref_loss.item(), max_rel(work[:, :V], ref.grad))
        del ref, work
        grads = {}
        for name, fn in (("plain", plain_linear_cross_entropy), ("fused", linear_cross_entropy)):
            loss = fwd_bwd(fn, x, w, t)()
            grads[name] = (loss.detach(), x.grad.clone(), w.grad.clone())
        fused_err = [max_rel(g, p) for g, p in zip(grads["fused"], grads["plain"])]
        del grads
        print(f"N={N} V={V}: kernel vs F.cross_entropy: loss {kernel_err[0]:.1e} rel, grad {kernel_err[1]:.1e} "
              f"(of max); fused vs plain: loss {fused_err[0]:.1e}, grad x {fused_err[1]:.1e}, grad W {fused_err[2]:.1e}")

        # 2. time
        times = {}
        for name, fn in (("plain, eager", plain_linear_cross_entropy), ("fused, eager", linear_cross_entropy),
                         ("plain, compiled", torch.compile(plain_linear_cross_entropy)),
                         ("fused, compiled", torch.compile(linear_cross_entropy))):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times[name] = (do_bench(fwd_bwd(fn, x, w, t), warmup=5, rep=50, return_mode="median"),
                           (torch.cuda.max_memory_allocated() - base) / 1e9)
        work = padded_copy(logits)
        n_valid = (t != -100).sum()
        roof_ms = 2 * N * V * logits.element_size() / bw * 1e3
        for name, (ms, gb) in times.items():
            rows.append((N, V, name, f"{ms:.2f}", f"{times['plain, compiled'][0] / ms:.2f}x", f"{gb:.1f}"))
        for block, warps in ((BLOCK, NUM_WARPS),) + SWEEP * args.sweep:
            kernel_ms = do_bench(lambda: cross_entropy_rows_(work, V, t, -100, n_valid, True, block, warps),
                                 warmup=5, rep=50, return_mode="median")
            rows.append((N, V, f"rows kernel only, block {block}, {warps} warps", f"{kernel_ms:.2f}",
                         f"{kernel_ms / roof_ms:.2f}x roofline", ""))
        del logits, work, x, w
        torch._dynamo.reset()

    print("\n| N | V | output layer + loss, fwd+bwd | median ms | vs plain compiled | peak GB over inputs |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


if __name__ == "__main__":
    main()
