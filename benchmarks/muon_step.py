"""GPU: Muon's optimizer step alone, torch.optim.Muon (one Newton-Schulz per matrix) against
BatchedMuon (one per shape), on the hidden matrices of each preset.

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/muon_step.py [--presets mla-125m,latentformer-348m]
On the CPU:  PYTHONPATH=src python benchmarks/muon_step.py --device cpu --presets tiny --steps 3
For each preset: the 2-D matrices Muon takes (`muon_groups`) with random gradients, Moonlight's lr
matching, the trainer's momentum and weight decay. Time: median of timed steps after warm-up (CUDA
events on the GPU). Parity: from the same parameters and gradients, the largest difference between
the two steps' parameters, as a fraction of the largest single update. On the GPU both run
Newton-Schulz in bf16 (batched matmuls or not may round differently; on the CPU in bf16 they are
bitwise equal, tests/train/test_schedule_optim.py); on the CPU BatchedMuon runs it in fp32, its
default there, so the column shows bf16's rounding of the update. Prints a table; no assertion on time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentformer import ModelConfig, Transformer
from latentformer.train.optim import BatchedMuon, muon_groups


def timed_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Median ms of `steps` optimizer steps after 3 warm-up steps."""
    times = []
    for i in range(steps + 3):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            opt.step()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 3:
            times.append(ms)
    return statistics.median(times)


def compare(preset: str, steps: int, device: str) -> tuple:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelConfig.preset(preset))
    params = muon_groups(model)[0][1]  # the 2-D matrices (torch.optim.Muon takes no stacks)
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    hyper = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    result = {}
    for name, kind in (("torch", torch.optim.Muon), ("batched", BatchedMuon)):
        with torch.no_grad():
            for p, p0, g in zip(params, start, grads):
                p.copy_(p0)
                p.grad = g
        opt = kind(params, **hyper)
        opt.step()
        result[name] = [p.detach().clone() for p in params]
        result[name + " ms"] = timed_steps(opt, steps, device)
    update = max((a - s).abs().max().item() for a, s in zip(result["torch"], start))
    diff = max((a - b).abs().max().item() for a, b in zip(result["torch"], result["batched"]))
    shapes = len({p.shape for p in params})
    return preset, len(params), shapes, result["torch ms"], result["batched ms"], diff / update


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="mla-125m,latentformer-348m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    print(torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
          "torch", torch.__version__)
    rows = [compare(preset, args.steps, args.device) for preset in args.presets.split(",")]
    print(f"\n{'preset':20} {'matrices':>8} {'shapes':>6} {'torch ms':>9} {'batched ms':>10} {'speedup':>8} {'max diff / update':>18}")
    for preset, n, shapes, t, b, diff in rows:
        print(f"{preset:20} {n:8d} {shapes:6d} {t:9.2f} {b:10.2f} {t / b:7.2f}x {diff:18.2e}")
