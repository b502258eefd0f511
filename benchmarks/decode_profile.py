"""Where a compiled decode step spends its GPU time: per-kernel totals for one step.

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/decode_profile.py [--preset P] [--batch B] [--ctx S]
The step is `GraphDecodeStep(compile=True)`'s compiled function, profiled outside the graph
(kernel durations are the same; the graph only removes launch gaps); the graph replay time
is printed beside the kernels' sum, so the difference is what launches and gaps cost.
"""

from __future__ import annotations

import argparse

import torch
from decode_throughput import build, filled_cache, time_steps
from kernel_table import kernel_table

from latentformer.infer.cuda_graph import GraphDecodeStep

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mla-125m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    args = ap.parse_args()
    model = build(args.preset, args.ctx)
    cache = filled_cache(model, args.batch, args.ctx)
    step = GraphDecodeStep(model, cache, compile=True)
    replay_ms = time_steps(step.graph.replay, cache, args.ctx)
    fn = torch.compile(model, dynamic=False)  # the same compiled code (cached), called without the graph
    tok = step.tokens
    with torch.no_grad():
        for _ in range(3):
            fn(tok, cache=cache)
        print(f"\n{args.preset} B{args.batch} ctx {args.ctx}: graph replay {replay_ms:.3f} ms")
        kernel_table(lambda: fn(tok, cache=cache), "the same step outside the graph")
