"""Variants of the compiled absorbed decode step at one point (default mla-125m, batch 64, 8k context).

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/decode_tuning.py [--preset P] [--batch B] [--ctx S]
Each row builds a `GraphDecodeStep(compile=True)` under one variant, with its own cache; then all
graphs are timed in 5 interleaved rounds (median of 30 replays each; "ms" = median over rounds,
"spread" = (max - min) / median over rounds), so clock drift hits every row alike; the baseline may
be listed twice ("baseline again") as a check.
Variants: the decode kernel's cache slices per row, the new token finished by torch ops instead of
in the kernel, SwiGLU's gate and up as one GEMM, inductor's GEMM autotuning, cuBLAS instead of the small-batch products (kernels/decode_gemm.py) and their launch
parameters (incl. K splits of the output and down products), programmatic dependent launch (PDL) of inductor's kernels (results:
benchmarks/RESULTS.md, 2026-11-25 and 2026-11-29). Every row reports the relative difference of its
logits from the first row's on the same cache and tokens (0 for variants that change no arithmetic,
bf16 rounding level for different summation orders).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
import torch._inductor.config as inductor_config
from decode_throughput import bandwidth, build, filled_cache, time_steps, weight_bytes
from kernel_table import kernel_table

from latentformer.infer.cuda_graph import GraphDecodeStep
from latentformer.kernels import decode_gemm, mla_decode


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
def unfused_new_token():
    """The new token finished by torch ops (kv_a_norm, rope, index_copy into the cache; inductor makes
    about four kernels per layer of them) and handed to the kernel as cached, as before 2026-11-29 evening."""
    from latentformer.model.norm import rms_norm
    from latentformer.model.rope import apply_rope

    orig = mla_decode.latent_decode_attention

    def call(q_lat, q_pe, latent, r, scale, pad, length=None, *, new=None, **kw):
        if new is not None:
            cos, sin = new.cos[:, None], new.sin[:, None]
            k_pe = apply_rope(new.kv[:, None, None, r:], cos, sin, new.interleave)[:, 0, 0]
            q_pe = apply_rope(q_pe[:, None], cos, sin, new.interleave)[:, 0]
            slot = (length - 1).view(1) if length is not None else torch.tensor([latent.shape[1] - 1], device=latent.device)
            kv = torch.cat((rms_norm(new.kv[:, :r], new.norm_weight, new.eps), k_pe), dim=-1)
            latent.index_copy_(1, slot, kv[:, None].to(latent.dtype))
        return orig(q_lat, q_pe, latent, r, scale, pad, length, **kw)

    mla_decode.latent_decode_attention = call
    try:
        yield
    finally:
        mla_decode.latent_decode_attention = orig


@contextlib.contextmanager
def gemm_args(enabled: bool = True, **kw):
    """The small-batch products (kernels/decode_gemm.py) off, or with these launch parameters
    (`k_splits` applies only where the shipped code splits K: the products before a residual add)."""
    orig = decode_gemm.supported, decode_gemm.linear, decode_gemm.swiglu
    if not enabled:
        decode_gemm.supported = lambda *tensors: False
    if kw:
        decode_gemm.linear, decode_gemm.swiglu = functools.partial(orig[1], **kw), functools.partial(orig[2], **kw)
    try:
        yield
    finally:
        decode_gemm.supported, decode_gemm.linear, decode_gemm.swiglu = orig


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
def autotune(on: bool):
    with inductor_config.patch(max_autotune=on, max_autotune_gemm_backends="ATEN,TRITON"):
        yield


def check_kernel(B: int = 8, H: int = 12, r: int = 128, dr: int = 32, S: int = 3000) -> None:
    """The decode kernel against an fp32 reference (random inputs, ragged rows)."""
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
    got = mla_decode.latent_decode_attention(q_lat, q_pe, latent, r, scale, pad, length).float()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"decode kernel: rel err {err:.1e} vs fp32", flush=True)
    assert err < 1e-2


def gemm_table(M: int = 64) -> None:
    """Small-batch products vs torch (cuBLAS) at mla-125m's decode shapes: 12 distinct weights per CUDA
    graph (as 12 layers; no weight stays in L2), median replay time per product, numerics vs fp32."""
    shapes = [("w_in (q+kv_a, merged)", 768, 2080, False), ("w_out (W_UV o_proj)", 1536, 768, False),
              ("gate+up+silu", 768, 2304, True), ("down", 2304, 768, False)]
    print(f"{'product, M=' + str(M):24} {'K':>5} {'N':>5} {'torch us':>9} {'ours us':>8} {'ours GB/s':>10} {'rel err':>8}")
    for name, K, N, glu in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(12 * (1 + glu))]
        pairs = list(zip(ws[0::2], ws[1::2])) if glu else [(w, None) for w in ws]

        def torch_fn(w, w2):
            return torch.nn.functional.silu(x @ w.T) * (x @ w2.T) if glu else x @ w.T

        def ours(w, w2):
            return decode_gemm.swiglu(x, w, w2) if glu else decode_gemm.linear(x, w)

        w, w2 = pairs[0]
        ref = x.float() @ w.float().T
        if glu:
            ref = torch.nn.functional.silu(ref) * (x.float() @ w2.float().T)
        err = ((ours(w, w2).float() - ref).norm() / ref.norm()).item()
        times = []
        for fn in (torch_fn, ours):
            for w, w2 in pairs:
                fn(w, w2)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for w, w2 in pairs:
                    fn(w, w2)
            ts = []
            for _ in range(55):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); g.replay(); b.record(); torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            times.append(sorted(ts[5:])[25] * 1e3 / len(pairs))
        gbs = N * K * 2 * (1 + glu) / (times[1] * 1e-6) / 1e9
        print(f"{name:24} {K:5} {N:5} {times[0]:9.2f} {times[1]:8.2f} {gbs:10.0f} {err:8.1e}", flush=True)


def capture(model, B: int, ctx: int, name: str, variant, profile: bool = False):
    """A compiled decode graph built under `variant` with its own filled cache, and the logits of one step."""
    torch._dynamo.reset()
    torch.manual_seed(1)  # the same cache contents for every variant
    cache = filled_cache(model, B, ctx)
    with variant(), torch.no_grad():
        step = GraphDecodeStep(model, cache, compile=True)
        assert step.compiled
        cache.pos = ctx
        cache.length.fill_(ctx)
        step.graph.replay()
        logits = step.logits.float().clone()
        if profile:
            fn = torch.compile(model, dynamic=False)
            for _ in range(3):
                fn(step.tokens, cache=cache)
            kernel_table(lambda: fn(step.tokens, cache=cache), f"kernels of one step ({name})")
    return step, cache, logits


def interleaved_ms(graphs: dict, ctx: int, rounds: int = 5, reps: int = 30) -> dict:
    """Median ms per replay for each captured graph, timed in interleaved rounds (a drift of the GPU's
    clock hits every variant alike): {name: [median of each round]}."""
    out: dict = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, (step, cache, _) in graphs.items():
            out[name].append(time_steps(step.graph.replay, cache, ctx, reps=reps))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mla-125m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--splits", default="8,11,16,24,33")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-checks", action="store_true", help="skip the kernel numerics check and the product table")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variant names (default: all)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if not args.no_checks:
        check_kernel()
        gemm_table()
    bw = bandwidth()
    model = build(args.preset, args.ctx)
    roof = (weight_bytes(model) + model.kv_cache_bytes_per_token(torch.bfloat16) * args.batch * args.ctx) / bw * 1e3
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, roofline {roof:.3f} ms", flush=True)
    variants = [("baseline", kernel_args)]
    variants += [(f"splits={n}", functools.partial(kernel_args, n_splits=int(n))) for n in args.splits.split(",") if n]
    variants += [("fused gate+up", fused_gate_up), ("gemm autotune", lambda: autotune(True)),
                 ("inductor pdl", inductor_pdl), ("cublas", functools.partial(gemm_args, False)),
                 ("gemm bk128", functools.partial(gemm_args, block_k=128)), ("gemm bk512", functools.partial(gemm_args, block_k=512)),
                 ("gemm stages4", functools.partial(gemm_args, num_stages=4)),
                 ("gemm warps8", functools.partial(gemm_args, num_warps=8)),
                 ("no split-k", functools.partial(gemm_args, k_splits=1)),
                 ("split-k 2", functools.partial(gemm_args, k_splits=2)), ("split-k 4", functools.partial(gemm_args, k_splits=4)),
                 ("unfused new token", unfused_new_token),
                 ("baseline again", kernel_args), ("cublas again", functools.partial(gemm_args, False))]
    if args.variants:
        names = args.variants.split(",")
        variants = sorted((v for v in variants if v[0] in names), key=lambda v: names.index(v[0]))
    graphs = {}
    for name, variant in variants:
        t0 = time.time()
        try:
            graphs[name] = capture(model, args.batch, args.ctx, name, variant, profile=args.profile and name in ("baseline", "no split-k", "unfused new token"))
        except Exception as e:  # keep the table
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"{name}: captured in {time.time() - t0:.0f} s", flush=True)
    first = next(iter(graphs.values()))[2]
    rounds = interleaved_ms(graphs, args.ctx)
    rows = [(name, statistics.median(ms), (max(ms) - min(ms)) / statistics.median(ms), ((g[2] - first).norm() / first.norm()).item())
            for (name, ms), g in zip(rounds.items(), graphs.values())]
    print(f"\n{args.preset} B{args.batch} ctx {args.ctx}: roofline {roof:.3f} ms")
    print(f"{'variant':20} {'ms':>8} {'x roof':>7} {'spread':>7} {'logits vs row 1':>16}")
    for name, ms, spread, diff in rows:
        print(f"{name:20} {ms:8.3f} {ms / roof:7.2f} {spread:7.1%} {diff:16.1e}")
