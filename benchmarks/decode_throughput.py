"""GPU decode throughput: MLA absorbed vs naive vs the MHA baseline, against the memory roofline.

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/decode_throughput.py [--quick] [--data DIR]
For each preset, batch and context: the cache is filled with random values up to the
context (decode time does not depend on them), then one-token decode steps are timed
(median over replays) as a CUDA graph (latentformer.infer.cuda_graph) and eagerly.
Roofline = (weight bytes + cache bytes read per step) / measured copy bandwidth.
Also: correctness of the graph-captured absorbed step against the eager naive one, and
the largest batch at 8k context whose cache fits in memory, MLA vs MHA. With --data (a prepared
GPT-2 data set) also: `latentformer.generate(compile=True)` against transformers'
`DeepseekV3ForCausalLM.generate` on the same weights (exported with `export_hf`), batch 64,
4k-token prompts of real text, greedy.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from latentformer import ModelConfig, Transformer
from latentformer.infer.cuda_graph import GraphDecodeStep
from latentformer.infer.decode import Decoder


def bandwidth() -> float:
    x = torch.empty(1024**3, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); y.copy_(x); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return 2 * x.numel() * 2 / (statistics.median(times[5:]) * 1e-3)


def build(preset: str, ctx: int) -> Transformer:
    cfg = ModelConfig.preset(preset).replace(max_seq_len=max(ctx + 64, 1024))
    torch.manual_seed(0)
    with torch.device("cuda"):
        return Transformer(cfg).to(torch.bfloat16).eval()


def filled_cache(model: Transformer, B: int, ctx: int):
    cache = model.make_cache(B, ctx + 8)
    for layer in cache.layers:
        for t in layer:
            t.normal_()
    cache.pos = ctx
    cache.length.fill_(ctx)
    return cache


def time_steps(fn, cache, ctx: int, reps: int = 30) -> float:
    times = []
    for i in range(reps + 5):
        cache.pos = ctx
        cache.length.fill_(ctx)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        if i >= 5:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench(preset: str, B: int, ctx: int, bw: float, modes) -> list[tuple]:
    rows = []
    for mode in modes:
        decode = "naive" if mode.startswith("naive") else "absorb"
        model = build(preset, ctx)
        need = model.kv_cache_bytes_per_token(torch.bfloat16) * B * (ctx + 8)
        if need > 0.7 * torch.cuda.mem_get_info()[0]:
            rows.append((preset, B, ctx, mode, None, None, None))
            continue
        cache = filled_cache(model, B, ctx)
        tok = torch.randint(0, 50000, (B, 1), device="cuda")
        try:
            with torch.no_grad():
                if "graph" in mode:
                    torch._dynamo.reset()  # every (model, B, ctx) is a new specialization: stay under the recompile limit
                    step = GraphDecodeStep(model, cache, compile=mode.endswith("compiled"), mla_decode=decode)
                    if mode.endswith("compiled") and not step.compiled:
                        mode += " (compile failed: uncompiled)"
                    step.tokens.copy_(tok)
                    ms = time_steps(step.graph.replay, cache, ctx)
                else:
                    step = Decoder(model, cache, decode)
                    ms = time_steps(lambda: step(tok), cache, ctx)
        except torch.OutOfMemoryError:
            rows.append((preset, B, ctx, mode, None, None, None))
            continue
        roof = (weight_bytes(model) + model.kv_cache_bytes_per_token(torch.bfloat16) * B * ctx) / bw * 1e3
        rows.append((preset, B, ctx, mode, ms, B / ms * 1e3, ms / roof))
        del cache, model
        torch.cuda.empty_cache()
    return rows


def check_numerics(B: int = 64) -> dict[str, float]:
    """Decode logits after a real prefill, each mode in bf16 vs the fp32 naive eager decode:
    rel err = ||out - ref|| / ||ref||. Absorbed and naive should sit at the same bf16 level.
    Batch 64 by default: the decode-batch products (kernels/decode_gemm.py, 32-64 rows) run there."""
    x = torch.randint(0, 50000, (B, 300), device="cuda")
    errs, ref = {}, None
    for mode, decode, dtype in [("fp32 naive eager", "naive", torch.float32), ("bf16 naive eager", "naive", torch.bfloat16),
                                ("bf16 absorb eager", "absorb", torch.bfloat16), ("bf16 absorb graph+compiled", "absorb", torch.bfloat16)]:
        model = build("mla-125m", 512).to(dtype)
        cache = model.make_cache(B, 512)
        with torch.no_grad():
            model(x[:, :256], cache=cache)
            if "graph" in mode:
                step = GraphDecodeStep(model, cache, compile=True, mla_decode=decode)
                logits = [step(x[:, t:t + 1]).clone() for t in range(256, 300)]
            else:
                step = Decoder(model, cache, decode)
                logits = [step(x[:, t:t + 1]) for t in range(256, 300)]
        out = torch.cat(logits, 1).float()
        if ref is None:
            ref = out
        else:
            errs[mode] = ((out - ref).norm() / ref.norm()).item()
    return errs


def max_batch(preset: str, ctx: int = 8192) -> tuple[int, int, int]:
    """Largest batch whose bf16 cache at `ctx` fits beside the weights (2 GiB kept for activations);
    returns (batch, bytes the allocation measured, bytes by kv_cache_bytes_per_token x tokens)."""
    gc.collect()
    torch.cuda.empty_cache()
    model = build(preset, ctx)
    per_row = model.kv_cache_bytes_per_token(torch.bfloat16) * ctx
    free = torch.cuda.mem_get_info()[0] - 2 * 1024**3
    b = int(free // per_row)
    before = torch.cuda.memory_allocated()
    cache = model.make_cache(b, ctx)  # must succeed
    measured = torch.cuda.memory_allocated() - before
    del cache, model
    torch.cuda.empty_cache()
    return b, measured, per_row * b


def prompts(data_dir: str, tokenizer, B: int, n_tokens: int) -> list[str]:
    """B texts of about n_tokens tokens each, cut from the corpus's training split."""
    from latentformer.data.dataset import TokenData

    toks = TokenData(data_dir).tokens("train")
    step = (len(toks) - n_tokens) // B
    return [tokenizer.decode(toks[i * step:i * step + n_tokens].tolist()) for i in range(B)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def generate_vs_transformers(data_dir: str, preset: str = "mla-125m", B: int = 64, ctx: int = 4096, new: int = 128) -> list[tuple]:
    """Decode tokens/s of both libraries' generate: (time of new+1 tokens - time of 1 token) per
    new token x B, so prefill and (ours) the one-time compilation stay out; greedy on both sides."""
    from transformers import DeepseekV3ForCausalLM

    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.infer.generate import generate
    from latentformer.interop.hf import export_hf

    tok = load_tokenizer("gpt2")
    texts = prompts(data_dir, tok, B, ctx - 8)
    model = build(preset, ctx + new)
    lengths = [len(tok.encode(t)) for t in texts]
    rows = []
    ours = lambda n: generate(model, tok, texts, max_new_tokens=n, temperature=0.0, compile=True)  # noqa: E731
    first_ours = ours(1)
    ours(new + 1)  # compiles the step (excluded)
    t = timed(lambda: ours(new + 1)) - timed(lambda: ours(1))
    rows.append(("latentformer generate(compile=True)", B, max(lengths), new, B * new / t))
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, d)
        del model
        torch.cuda.empty_cache()
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    enc = [tok.encode(t) for t in texts]
    L = max(lengths)
    ids = torch.tensor([[tok.eot_id] * (L - len(e)) + e for e in enc], device="cuda")
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc], device="cuda")

    def theirs(n: int) -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=tok.eot_id)

    first_hf = theirs(1)[:, L]
    theirs(2)
    t = timed(lambda: theirs(new + 1)) - timed(lambda: theirs(1))
    rows.append(("transformers DeepseekV3 generate", B, L, new, B * new / t))
    agree = sum(a == tok.decode([b]) for a, b in zip(first_ours, first_hf.tolist()))
    print(f"first greedy token, ours vs transformers: {agree}/{B} rows agree")
    del hf
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only batch 64, 8k context (the target point)")
    ap.add_argument("--data", help="prepared GPT-2 data set: adds the transformers generate comparison")
    ap.add_argument("--sizes", default="1x1024,16x8192,64x1024,64x8192,64x32768", help="batch x context points")
    ap.add_argument("--no-checks", action="store_true", help="skip the numerics check and the max-batch probe")
    ap.add_argument("--presets", default="mla-125m,mha-125m,latentformer-348m",
                    help="comma-separated presets (MLA ones decode absorbed; the 348m runs unless --quick)")
    args = ap.parse_args()
    quick = args.quick
    print(torch.cuda.get_device_name(), torch.__version__)
    bw = bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    if not args.no_checks:
        (b_mla, got_mla, want_mla), (b_mha, got_mha, want_mha) = max_batch("mla-125m"), max_batch("mha-125m")
        print(f"largest batch at 8k context whose cache fits: mla-125m {b_mla}, mha-125m {b_mha} ({b_mla / b_mha:.1f}x)")
        print(f"cache allocation measured / formula: mla-125m {got_mla:,} / {want_mla:,} bytes, "
              f"mha-125m {got_mha:,} / {want_mha:,} bytes")
        for mode, err in check_numerics().items():
            print(f"numerics, mla-125m B64 decode vs fp32 naive: {mode:28} rel err {err:.1e}")
    gen_rows = generate_vs_transformers(args.data) if args.data else []
    if gen_rows:
        print("\ngenerate, greedy, decode tokens/s (prefill and compilation excluded)")
        print(f"{'':38} {'B':>3} {'prompt':>6} {'new':>4} {'tok/s':>9} {'ratio':>6}")
        for name, B, L, new, tps in gen_rows:
            print(f"{name:38} {B:>3} {L:>6} {new:>4} {tps:9.0f} {tps / gen_rows[-1][4]:6.1f}", flush=True)

    def line(p, B, ctx, mode, ms, tps, xr) -> str:
        tail = f"{'OOM':>8}" if ms is None else f"{ms:8.3f} {tps:9.0f} {xr:7.2f}"
        return f"{p:18} {B:>3} {ctx:>6} {mode:22} {tail}"

    rows = []
    sizes = [(64, 8192)] if quick else [tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")]
    for B, ctx in sizes:
        target = (B, ctx) == (64, 8192)
        for preset in args.presets.split(","):
            if preset == "latentformer-348m" and quick:
                continue
            if ModelConfig.preset(preset).attention != "mla":
                modes = ["graph+compiled"] + ["graph"] * target
            elif preset == "mla-125m":
                modes = ["absorb graph+compiled"] + ["absorb graph", "absorb eager", "naive graph+compiled"] * target
            else:
                modes = ["absorb graph+compiled"]
            new_rows = bench(preset, B, ctx, bw, modes)
            for row in new_rows:  # as they come: a cut-off run keeps what it measured
                print(line(*row), flush=True)
            rows += new_rows
    print("\ndecode step, bf16 (median ms per step; tokens/s = batch / step; x roof = step / roofline)")
    print(f"{'model':18} {'B':>3} {'ctx':>6} {'mode':22} {'ms':>8} {'tok/s':>9} {'x roof':>7}")
    for row in rows:
        print(line(*row))
