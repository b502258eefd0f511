"""GPU: choose MLA's training attention kernel and check/time the fused absorbed decode kernel.

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/attention_kernels.py
Part A times causal attention forward+backward at MLA training shapes (q/k dim != v dim) for
each SDPA backend (FLASH needs v padded to the q/k dim) and FlexAttention. Part B checks the Triton decode
kernel against an fp32 reference and times it against the matmul path and the memory
roofline (cache bytes / measured copy bandwidth). `--sweep` (part C) times the decode kernel's
launch parameters as a decode step runs it (one CUDA graph over 12 layers' caches) against the
defaults. Prints tables; no assertion on time.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from latentformer.kernels.mla_decode import latent_decode_attention


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)  # read + write


_flex: dict = {}


def flex_causal(q, k, v):
    """FlexAttention (torch.compile'd; the causal block mask built once per length, outside the
    timing); handles q/k dim != v dim natively."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    T = q.shape[2]
    if T not in _flex:
        _flex[T] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=q.device)
    return _flex["fn"](q, k, v, block_mask=_flex[T])


def attn_variant(name):
    def run(q, k, v):
        if name == "flex (compiled)":
            return flex_causal(q, k, v)
        if name == "flash(v padded)":
            vp = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, vp, is_causal=True)[..., : v.shape[-1]]
        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(name)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def part_a():
    rows = []
    for B, H, T, dqk, dv in [(16, 12, 1024, 96, 64), (4, 12, 4096, 96, 64), (8, 16, 1024, 96, 80)]:
        q = torch.randn(B, H, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, H, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, H, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, T, dv, device="cuda", dtype=torch.bfloat16)
        # reference on a slice in fp32 math
        sl = (slice(0, 1), slice(0, 2))
        ref = F.scaled_dot_product_attention(q[sl].float(), k[sl].float(), v[sl].float(), is_causal=True)
        flops = 4 * B * H * T * T * (dqk + dv) / 2 * 3.5 / 2  # causal fwd (2 matmuls) + bwd (2.5x fwd)
        for name in ["default", "cudnn", "flash(v padded)", "efficient", "flex (compiled)"]:
            fn = attn_variant(name)
            try:
                out = fn(q, k, v)
                err = rel(out[sl], ref)

                def step():
                    q.grad = k.grad = v.grad = None
                    fn(q, k, v).backward(g)
                ms = do_bench(step, warmup=20, rep=200, return_mode="median")
                rows.append((f"B{B} H{H} T{T} {dqk}/{dv}", name, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}", f"{err:.1e}"))
            except Exception as e:  # a backend that refuses the shape: report it in the table
                rows.append((f"B{B} H{H} T{T} {dqk}/{dv}", name, "n/a", "", str(e).splitlines()[0][:40]))
    print("\nA. causal attention fwd+bwd, bf16 (median ms; TFLOP/s; rel err vs fp32)")
    print(f"{'shape':28} {'kernel':16} {'ms':>8} {'TFLOP/s':>8} {'rel err':>9}")
    for r in rows:
        print(f"{r[0]:28} {r[1]:16} {r[2]:>8} {r[3]:>8} {r[4]:>9}")


def matmul_path(q_lat, q_pe, latent, r, scale):
    B, H, _ = q_lat.shape
    q = torch.cat((q_lat, q_pe), -1)
    s = torch.matmul(q, latent.transpose(1, 2)).float() * scale
    return torch.matmul(s.softmax(-1).to(latent.dtype), latent[..., :r])


def part_b(bw):
    H, r, dr = 12, 256, 32
    scale = 96 ** -0.5
    rows = []
    for B in (1, 16, 64):
        for S in (1024, 8192, 32768):
            latent = torch.randn(B, S, r + dr, device="cuda", dtype=torch.bfloat16)
            q_lat = torch.randn(B, H, r, device="cuda", dtype=torch.bfloat16)
            q_pe = torch.randn(B, H, dr, device="cuda", dtype=torch.bfloat16)
            arrivals = torch.zeros(B, dtype=torch.int32, device="cuda")  # kept, as a decode loop keeps the cache's
            out = latent_decode_attention(q_lat, q_pe, latent, r, scale, None, arrivals=arrivals)
            ref = matmul_path(q_lat.float(), q_pe.float(), latent.float(), r, scale)
            err = rel(out, ref)
            pad = torch.randint(0, S // 2, (B,), device="cuda")
            outp = latent_decode_attention(q_lat, q_pe, latent, r, scale, pad)
            errp = max(rel(outp[b], matmul_path(q_lat[b:b + 1].float(), q_pe[b:b + 1].float(),
                                                 latent[b:b + 1, pad[b]:].float(), r, scale)[0]) for b in range(min(B, 4)))
            t_k = do_bench(lambda: latent_decode_attention(q_lat, q_pe, latent, r, scale, None, arrivals=arrivals),
                           warmup=20, rep=100, return_mode="median")
            t_m = do_bench(lambda: matmul_path(q_lat, q_pe, latent, r, scale), warmup=20, rep=100, return_mode="median")
            roof = latent.numel() * 2 / bw * 1e3
            rows.append((B, S, t_k, t_m, roof, err, errp))
            del latent
    print(f"\nB. absorbed MLA decode attention, H={H} r={r} dr={dr} bf16 (median ms; roofline = cache bytes / {bw / 1e12:.2f} TB/s)")
    print(f"{'B':>3} {'S':>6} {'triton':>8} {'matmul':>8} {'roofline':>9} {'triton/roof':>11} {'err':>8} {'err pad':>8}")
    for B, S, tk, tm, roof, err, errp in rows:
        print(f"{B:>3} {S:>6} {tk:8.3f} {tm:8.3f} {roof:9.3f} {tk / roof:11.2f} {err:8.1e} {errp:8.1e}")


def part_c(bw):
    """Launch-parameter sweep of the decode kernel at the presets' decode shapes, timed as inside a
    decode step: one CUDA graph of n_layers launches over n_layers distinct caches (nothing stays in
    L2); variants interleaved over 3 rounds (median of the rounds' medians) so drift hits them alike."""
    scale = 96 ** -0.5
    dr, L = 32, 12
    variants = [(sp, st, 64, 4) for sp in (None, 2, 3, 4, 6, 8) for st in (2, 3, 4)]
    variants += [(sp, 3, bs, w) for sp in (None, 4) for bs, w in ((32, 4), (64, 8), (128, 4), (128, 8))]
    print(f"\nC. decode kernel sweep, {L} launches per graph (median ms per launch; x roof = time / (cache bytes / {bw / 1e12:.2f} TB/s))")
    print(f"{'shape':26} {'splits/stages/S/w':>23} {'ms':>8} {'x roof':>7} {'spread':>7}")
    for label, H, r, B, S in (("mla-125m B64 8k", 12, 128, 64, 8192), ("latentformer-348m B64 8k", 16, 256, 64, 8192),
                              ("mla-125m B16 32k", 12, 128, 16, 32768)):
        latents = [torch.randn(B, S, r + dr, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
        q_lat = torch.randn(B, H, r, device="cuda", dtype=torch.bfloat16)
        q_pe = torch.randn(B, H, dr, device="cuda", dtype=torch.bfloat16)
        length = torch.full((), S, dtype=torch.int32, device="cuda")
        ref = matmul_path(q_lat.float(), q_pe.float(), latents[0].float(), r, scale)
        roof = latents[0].numel() * 2 / bw * 1e3
        graphs = {}
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        previous = (max(1, min(-(-S // 256), -(-2 * sms // B))), 2, 64, 4)  # the defaults before 2026-11-25
        for splits, stages, block_s, warps in variants + [previous]:
            kw = dict(n_splits=splits, num_stages=stages, block_s=block_s, num_warps=warps,
                      arrivals=torch.zeros(B, dtype=torch.int32, device="cuda"))  # no zeroing kernel in the graph
            err = rel(latent_decode_attention(q_lat, q_pe, latents[0], r, scale, None, length, **kw), ref)
            assert err < 1e-2, (kw, err)
            for _ in range(2):
                [latent_decode_attention(q_lat, q_pe, lat, r, scale, None, length, **kw) for lat in latents]
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                [latent_decode_attention(q_lat, q_pe, lat, r, scale, None, length, **kw) for lat in latents]
            graphs[f"{splits or 'default'}/{stages}/{block_s}/{warps}" + (" (old)" if (splits, stages, block_s, warps) == previous else "")] = g
        rounds: dict = {k: [] for k in graphs}
        for _ in range(3):
            for cfg, g in graphs.items():
                times = []
                for _ in range(15):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); g.replay(); b.record(); torch.cuda.synchronize()
                    times.append(a.elapsed_time(b) / L)
                rounds[cfg].append(sorted(times)[len(times) // 2])
        for cfg, ms in sorted(rounds.items(), key=lambda kv: sorted(kv[1])[1]):
            med = sorted(ms)[1]
            print(f"{label:26} {cfg:>23} {med:8.4f} {med / roof:7.2f} {(max(ms) - min(ms)) / med:7.1%}")
        del latents, graphs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if "--train-only" in sys.argv:
        part_a()
        sys.exit()
    if "--sweep" in sys.argv:
        torch.manual_seed(0)
        part_c(bandwidth())
        sys.exit()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    bw = bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s")
    part_b(bw)
    if "--decode-only" not in sys.argv:
        part_a()
