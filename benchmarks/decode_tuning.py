"""Variants of the compiled absorbed decode step at one point (default mla-125m, batch 64, 8k context).

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/decode_tuning.py [--preset P] [--batch B] [--ctx S]
Each row rebuilds `GraphDecodeStep(compile=True)` under one variant and times graph replays
(median of 100); the baseline runs first and last, so its two figures give the run's spread.
Variants: the decode kernel's cache slices per row, SwiGLU's gate and up as one GEMM, inductor's
GEMM autotuning, programmatic dependent launch (PDL) of inductor's kernels, of the decode kernels,
of both (results: benchmarks/RESULTS.md, 2026-11-25 and 2026-11-29). Every row reports the largest
difference of its logits from the first row's on the same cache and tokens (PDL changes no
arithmetic: a nonzero difference there would be a race).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import torch
import torch._inductor.config as inductor_config
from decode_throughput import bandwidth, build, filled_cache, time_steps, weight_bytes
from kernel_table import kernel_table

from latentformer.infer.cuda_graph import GraphDecodeStep
from latentformer.kernels import mla_decode


@contextlib.contextmanager
def kernel_args(**kw):
    """Keyword arguments for every decode-kernel call (none: the shipped defaults)."""
    orig = mla_decode.latent_decode_attention
    if kw:
        mla_decode.latent_decode_attention = functools.partial(orig, **kw)
    try:
        yield
    finally:
        mla_decode.latent_decode_attention = orig


@contextlib.contextmanager
def fused_gate_up():
    """SwiGLU with gate and up as one GEMM over a concatenated weight (built once here)."""
    import torch.nn.functional as F

    from latentformer.model.ffn import SwiGLU

    orig = SwiGLU.forward

    def forward(self, x):
        if getattr(self, "_gu", None) is None:
            self._gu = torch.cat((self.gate_proj.weight, self.up_proj.weight)).detach()
        g, u = F.linear(x, self._gu).chunk(2, dim=-1)
        return self.down_proj(F.silu(g) * u)

    SwiGLU.forward = forward
    try:
        yield
    finally:
        SwiGLU.forward = orig


@contextlib.contextmanager
def inductor_pdl(on: bool = True):
    """Inductor's Triton kernels launched with programmatic dependent launch (Hopper+): each may
    start while its predecessor drains and waits on it in-kernel (`gdc_wait`)."""
    with inductor_config.patch({"triton.enable_pdl": on}):
        yield


@contextlib.contextmanager
def all_pdl():
    with inductor_pdl(), kernel_args(pdl=True):
        yield


@contextlib.contextmanager
def autotune(on: bool):
    with inductor_config.patch(max_autotune=on, max_autotune_gemm_backends="ATEN,TRITON"):
        yield


def check_kernel(B: int = 8, H: int = 12, r: int = 128, dr: int = 32, S: int = 3000) -> None:
    """The decode op, with and without PDL, against an fp32 reference (random inputs, ragged rows)."""
    torch.manual_seed(2)
    q_lat, q_pe = (torch.randn(B, H, n, device="cuda", dtype=torch.bfloat16) for n in (r, dr))
    latent = torch.randn(B, S, r + dr, device="cuda", dtype=torch.bfloat16)
    pad = torch.randint(0, 500, (B,), device="cuda", dtype=torch.int32)
    length = torch.tensor(S - 7, device="cuda", dtype=torch.int32)
    scale = (r + dr) ** -0.5
    ref = torch.empty(B, H, r, device="cuda")
    for b in range(B):
        keys = latent[b, pad[b]:length].float()
        p = torch.softmax((keys[:, :r] @ q_lat[b].float().T + keys[:, r:] @ q_pe[b].float().T) * scale, dim=0)
        ref[b] = p.T @ keys[:, :r]
    for pdl in (False, True):
        try:
            got = mla_decode.latent_decode_attention(q_lat, q_pe, latent, r, scale, pad, length, pdl=pdl).float()
        except Exception as e:  # report, and still time the other variants
            print(f"decode op pdl={pdl}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"decode op pdl={pdl}: rel err {err:.1e} vs fp32 ({'ok' if err < 1e-2 else 'FAILED'})", flush=True)


def run(model, B: int, ctx: int, name: str, variant, profile: bool = False) -> tuple[float, torch.Tensor]:
    """Median ms of a graph replay, and the logits of one step from the filled cache."""
    torch._dynamo.reset()
    torch.manual_seed(1)  # the same cache contents for every variant
    cache = filled_cache(model, B, ctx)
    with variant(), torch.no_grad():
        step = GraphDecodeStep(model, cache, compile=True)
        assert step.compiled
        ms = time_steps(step.graph.replay, cache, ctx, reps=100)
        cache.pos = ctx
        cache.length.fill_(ctx)
        step.graph.replay()
        logits = step.logits.float().clone()
        if profile:
            fn = torch.compile(model, dynamic=False)
            for _ in range(3):
                fn(step.tokens, cache=cache)
            kernel_table(lambda: fn(step.tokens, cache=cache), f"kernels of one step ({name})")
    del step, cache
    torch.cuda.empty_cache()
    return ms, logits


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mla-125m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--splits", default="8,11,16,24,33")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variant names (default: all)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    check_kernel()
    bw = bandwidth()
    model = build(args.preset, args.ctx)
    roof = (weight_bytes(model) + model.kv_cache_bytes_per_token(torch.bfloat16) * args.batch * args.ctx) / bw * 1e3
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, roofline {roof:.3f} ms", flush=True)
    variants = [("baseline", kernel_args)]
    variants += [(f"splits={n}", functools.partial(kernel_args, n_splits=int(n))) for n in args.splits.split(",") if n]
    variants += [("fused gate+up", fused_gate_up), ("gemm autotune", lambda: autotune(True)),
                 ("inductor pdl", inductor_pdl), ("kernel pdl", functools.partial(kernel_args, pdl=True)),
                 ("all pdl", all_pdl), ("baseline again", kernel_args)]
    if args.variants:
        names = args.variants.split(",")
        variants = sorted((v for v in variants if v[0] in names), key=lambda v: names.index(v[0]))
    rows, first = [], None
    for name, variant in variants:
        t0 = time.time()
        try:
            ms, logits = run(model, args.batch, args.ctx, name, variant, profile=args.profile and name in ("baseline", "gemm autotune"))
        except Exception as e:  # keep the table
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        first = logits if first is None else first
        rows.append((name, ms, (logits - first).abs().max().item()))
        print(rows[-1], f"{time.time() - t0:.0f} s", flush=True)
    print(f"\n{args.preset} B{args.batch} ctx {args.ctx}: roofline {roof:.3f} ms")
    print(f"{'variant':20} {'ms':>8} {'x roof':>7} {'max |dlogits|':>14}")
    for name, ms, diff in rows:
        print(f"{name:20} {ms:8.3f} {ms / roof:7.2f} {diff:14.2e}")
