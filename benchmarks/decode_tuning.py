"""Variants of the compiled absorbed decode step at one point (default mla-125m, batch 64, 8k context).

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/decode_tuning.py [--preset P] [--batch B] [--ctx S]
Each row rebuilds `GraphDecodeStep(compile=True)` under one variant and times graph replays
(median of 100); the baseline runs first and last, so its two figures give the run's spread.
Variants: the decode kernel's cache slices per row, SwiGLU's gate and up as one GEMM, inductor's
GEMM autotuning (results and why none helped: benchmarks/RESULTS.md, 2026-11-25).
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch
import torch._inductor.config as inductor_config
from decode_throughput import bandwidth, build, filled_cache, time_steps, weight_bytes
from kernel_table import kernel_table

from latentformer.infer.cuda_graph import GraphDecodeStep
from latentformer.kernels import mla_decode


@contextlib.contextmanager
def splits(n: int | None):
    orig = mla_decode.latent_decode_attention
    if n is not None:
        mla_decode.latent_decode_attention = functools.partial(orig, n_splits=n)
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
def autotune(on: bool):
    with inductor_config.patch(max_autotune=on, max_autotune_gemm_backends="ATEN,TRITON"):
        yield


def run(model, B: int, ctx: int, name: str, variant, profile: bool = False) -> float:
    torch._dynamo.reset()
    cache = filled_cache(model, B, ctx)
    with variant(), torch.no_grad():
        step = GraphDecodeStep(model, cache, compile=True)
        assert step.compiled
        ms = time_steps(step.graph.replay, cache, ctx, reps=100)
        if profile:
            fn = torch.compile(model, dynamic=False)
            for _ in range(3):
                fn(step.tokens, cache=cache)
            kernel_table(lambda: fn(step.tokens, cache=cache), f"kernels of one step ({name})")
    del step, cache
    torch.cuda.empty_cache()
    return ms


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mla-125m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--splits", default="8,11,16,24,33")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    bw = bandwidth()
    model = build(args.preset, args.ctx)
    roof = (weight_bytes(model) + model.kv_cache_bytes_per_token(torch.bfloat16) * args.batch * args.ctx) / bw * 1e3
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, roofline {roof:.3f} ms", flush=True)
    variants = [("baseline", lambda: splits(None))]
    variants += [(f"splits={n}", functools.partial(splits, int(n))) for n in args.splits.split(",") if n]
    variants += [("fused gate+up", fused_gate_up), ("gemm autotune", lambda: autotune(True)), ("baseline again", lambda: splits(None))]
    rows = []
    for name, variant in variants:
        try:
            ms = run(model, args.batch, args.ctx, name, variant, profile=args.profile and name in ("baseline", "gemm autotune"))
        except Exception as e:  # keep the table
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append((name, ms))
        print(rows[-1], flush=True)
    print(f"\n{args.preset} B{args.batch} ctx {args.ctx}: roofline {roof:.3f} ms")
    print(f"{'variant':20} {'ms':>8} {'x roof':>7}")
    for name, ms in rows:
        print(f"{name:20} {ms:8.3f} {ms / roof:7.2f}")
