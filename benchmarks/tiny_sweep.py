"""Sweep candidate recipes for `latentformer train` (tiny preset on sotu) at an equal time budget.

Each candidate runs as its own `latentformer train` process pinned to 2 cores with 2 threads
(the target machine is a 2-core CPU), all candidates side by side. Phase 1 times a few steps per
candidate; phase 2 trains each with max_steps = budget / step time, so every cosine schedule
completes within the budget. Prints one line per candidate: steps, minutes, val loss, val bpb.

    python benchmarks/tiny_sweep.py --data data/sotu-bpe4096 --budget 420 --names base,lr6e-3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SMALL = ["--model.d_model", "192", "--model.d_ff", "512", "--model.kv_lora_rank", "64",
         "--model.qk_nope_head_dim", "32", "--model.v_head_dim", "48"]
CANDIDATES = {
    "base": [],
    "bt8192": ["--train.micro_batch_size", "64", "--train.batch_tokens", "8192", "--train.lr", "4e-3"],
    "bt2048": ["--train.micro_batch_size", "16", "--train.batch_tokens", "2048", "--train.lr", "2e-3"],
    "d192": SMALL + ["--train.lr", "4e-3"],
    "L6": ["--model.n_layers", "6"],
    "d384L3": ["--model.d_model", "384", "--model.n_layers", "3", "--model.n_heads", "6", "--model.d_ff", "1024",
               "--model.kv_lora_rank", "128"],
    "lr6e-3": ["--train.lr", "6e-3"],
    # fixed-step candidates for the 2-core target machine (~250 steps of 2048 tokens in 7.5 min)
    "s260": ["--train.max_steps", "260", "--train.warmup_steps", "20", "--train.lr", "2e-3"],
    "s260lr3": ["--train.max_steps", "260", "--train.warmup_steps", "20", "--train.lr", "3e-3"],
    "s260lr5": ["--train.max_steps", "260", "--train.warmup_steps", "20", "--train.lr", "5e-3"],
    "s520bt1024": ["--train.max_steps", "520", "--train.warmup_steps", "40", "--train.lr", "2e-3",
                   "--train.micro_batch_size", "8", "--train.batch_tokens", "1024"],
    "s320d192": SMALL + ["--train.max_steps", "320", "--train.warmup_steps", "20", "--train.lr", "3e-3"],
    "s130": ["--train.max_steps", "130", "--train.warmup_steps", "10", "--train.lr", "3e-3"],
    "s130bt1024": ["--train.max_steps", "260", "--train.warmup_steps", "20", "--train.lr", "3e-3",
                   "--train.micro_batch_size", "8", "--train.batch_tokens", "1024"],
}


def launch(name: str, args: list[str], data: str, out: Path, cores: str, steps: int, evals: int) -> subprocess.Popen:
    cmd = ["taskset", "-c", cores, sys.executable, "-m", "latentformer", "train", "--data", data, "--out", str(out / name),
           "--force", "--no-sample", "--train.device", "cpu", "--train.threads", "2", "--train.max_steps", str(steps),
           "--train.eval_interval", str(evals), "--train.log_interval", "10", "--train.tensorboard", "false", *args]
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="/tmp/sweep")
    p.add_argument("--budget", type=float, default=420.0, help="training seconds per candidate")
    p.add_argument("--names", default=",".join(CANDIDATES))
    p.add_argument("--fixed", action="store_true", help="no timing phase: candidates give --train.max_steps")
    p.add_argument("--extra", default="", help="overrides added to every candidate, space separated")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.names.split(",")
    extra = a.extra.split()
    cores = [f"{2 * i},{2 * i + 1}" for i in range(len(names))]
    steps = {}
    for n in names if a.fixed else []:
        args = CANDIDATES[n]
        steps[n] = int(args[args.index("--train.max_steps") + 1])
    procs = [] if a.fixed else [launch(n, CANDIDATES[n] + extra, a.data, out, c, 20, 0) for n, c in zip(names, cores)]
    for pr in procs:
        pr.wait()
    for n in names if not a.fixed else []:
        recs = [json.loads(line) for line in (out / n / "metrics.jsonl").read_text().splitlines()]
        t10, t20 = [r["elapsed_s"] for r in recs if not r.get("eval") and r["step"] in (10, 20)]
        steps[n] = int(a.budget / ((t20 - t10) / 10))
        print(f"{n}: {(t20 - t10) / 10:.3f} s/step -> {steps[n]} steps", flush=True)
    t0 = time.time()
    procs = [launch(n, CANDIDATES[n] + extra, a.data, out, c, steps[n], max(steps[n] // 4, 1)) for n, c in zip(names, cores)]
    for pr in procs:
        pr.wait()
    for n in names:
        recs = [json.loads(line) for line in (out / n / "metrics.jsonl").read_text().splitlines()]
        ev = [r for r in recs if r.get("eval")]
        tr = [r for r in recs if not r.get("eval")]
        curve = " ".join(f"{r['bpb']:.3f}" for r in ev)
        print(f"{n}: {steps[n]} steps, {tr[-1]['elapsed_s'] / 60:.2f} min, train loss {tr[-1]['loss']:.3f}, "
              f"val loss {ev[-1]['loss']:.4f}, val bpb {ev[-1]['bpb']:.4f} (curve {curve})", flush=True)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
