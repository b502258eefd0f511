"""Multi-GPU scaling and loss parity through `torchrun -m latentformer train` (DDP and FSDP2).

Run on a machine with N >= 2 GPUs:  PYTHONPATH=src python benchmarks/multi_gpu.py --data DIR [--gpus 2]
Throughput: tokens/s per GPU (median of the logged windows after the first) at the same global
batch on 1 and N GPUs; scaling efficiency = tokens/s(N) / (N x tokens/s(1)).
Parity: 200 steps of mla-125m on 1 and N GPUs at the same global batch (the trainer draws the
same global batch on every world size), against run-to-run noise = the same 1-GPU run with
another seed. NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train(out: Path, gpus: int, preset: str, data: str, steps: int, micro: int, batch_tokens: int,
          parallel: str = "ddp", seed: int = 1337, timeout: int = 240) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "latentformer", "train", "--preset", preset, "--data", data, "--out", str(out), "--no-sample",
           "--train.max_steps", str(steps), "--train.micro_batch_size", str(micro), "--train.seq_len", "1024",
           "--train.batch_tokens", str(batch_tokens), "--train.parallel", parallel, "--train.seed", str(seed),
           "--train.log_interval", "10", "--train.eval_interval", "0", "--train.warmup_steps", "20",
           "--train.lr", "6e-4", "--train.min_lr", "6e-5", "--train.progress", "false", "--train.tensorboard", "false",
           "--train.eval_tokens", "65536"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line and '"tokens_per_s"' in line]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--parity-steps", type=int, default=200)
    args = ap.parse_args()
    N = args.gpus
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for preset, micro, parallel in [("mla-125m", 32, "ddp"), ("latentformer-348m", 16, "ddp"), ("latentformer-348m", 16, "fsdp")]:
        tps = {}
        for g in ([1, N] if parallel == "ddp" else [N]):
            recs = train(tmp / f"{preset}-{parallel}-{g}", g, preset, args.data, 40, micro, 65536, parallel)
            tps[g] = statistics.median(r["tokens_per_s"] for r in recs[1:])
            print(preset, parallel, g, f"{tps[g]:.0f} tokens/s", flush=True)
        for g, v in tps.items():
            rows.append((preset, parallel, g, v, v / g))
    print("\nthroughput, global batch 65536 tokens, seq 1024, bf16 eager (median tokens/s after warm-up)")
    print(f"{'model':20} {'mode':5} {'GPUs':>4} {'tokens/s':>10} {'per GPU':>9} {'scaling':>8}")
    base = {}
    for preset, parallel, g, v, per in rows:
        if g == 1:
            base[preset] = per
        eff = per / base[preset] if preset in base else float("nan")
        print(f"{preset:20} {parallel:5} {g:>4} {v:10.0f} {per:9.0f} {eff * 100:7.1f}%")

    curves = {}
    for name, g, seed in [("1 GPU", 1, 1337), (f"{N} GPUs", N, 1337), ("1 GPU, seed 1338", 1, 1338)]:
        recs = train(tmp / f"parity-{g}-{seed}", g, "mla-125m", args.data, args.parity_steps, 16, 32768, seed=seed)
        curves[name] = {r["step"]: r["loss"] for r in recs}
    a, b, c = curves["1 GPU"], curves[f"{N} GPUs"], curves["1 GPU, seed 1338"]
    steps = sorted(set(a) & set(b) & set(c))
    d_par = max(abs(a[s] - b[s]) for s in steps)
    d_noise = max(abs(a[s] - c[s]) for s in steps)
    print(f"\nloss parity, mla-125m, {args.parity_steps} steps, global batch 32768 tokens (loss every 10 steps)")
    print(f"{'step':>5} {'1 GPU':>8} {f'{N} GPUs':>8} {'seed 1338':>9}")
    for s in steps[:: max(1, len(steps) // 6)] + [steps[-1]]:
        print(f"{s:>5} {a[s]:8.4f} {b[s]:8.4f} {c[s]:9.4f}")
    print(f"max |1 GPU - {N} GPUs| = {d_par:.4f}; run-to-run noise (other seed) max |diff| = {d_noise:.4f}")
