"""CPU decode speed with the KV cache vs without it (the full sequence recomputed every step).

    .venv/bin/python benchmarks/decode_cpu.py [--prompt 1000] [--new 24] [--threads 2]

Random weights, batch 1, fp32, greedy. "cache": one prefill of the prompt, then one token per
step through the cache; "no cache": every step runs the whole sequence so far. decode tok/s
counts the generated tokens over the step time (the prefill is reported separately);
end-to-end tok/s includes it. "agree" counts the steps where both modes chose the same token
(random weights give near-ties, so fp32 rounding may flip a late one).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from latentformer import ModelConfig, Transformer
from latentformer.infer.decode import Decoder


@torch.inference_mode()
def run_cache(model: Transformer, prompt: torch.Tensor, new: int) -> tuple[list[int], float, float]:
    t0 = time.perf_counter()
    cache = model.make_cache(1, prompt.shape[1] + new)
    nxt = model.next_token_logits(prompt, cache).argmax(-1)
    step = Decoder(model, cache)  # the decode layer, as generate uses it
    t1 = time.perf_counter()
    out = [int(nxt)]
    for _ in range(new - 1):
        nxt = step(nxt[:, None])[:, -1].argmax(-1)
        out.append(int(nxt))
    return out, t1 - t0, time.perf_counter() - t1


@torch.inference_mode()
def run_no_cache(model: Transformer, prompt: torch.Tensor, new: int) -> tuple[list[int], float, float]:
    t0 = time.perf_counter()
    seq = prompt
    nxt = model(seq)[:, -1].argmax(-1)
    t1 = time.perf_counter()
    out = [int(nxt)]
    for _ in range(new - 1):
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        nxt = model(seq)[:, -1].argmax(-1)
        out.append(int(nxt))
    return out, t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "mla-125m"])
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"prompt {args.prompt} tokens, {args.new} new tokens, batch 1, fp32")
    print(f"{'model':10s} {'mode':9s} {'prefill s':>9s} {'decode tok/s':>12s} {'end-to-end tok/s':>16s} {'ratio':>6s} {'agree':>6s}")
    for name in args.models:
        cfg = ModelConfig.preset(name)
        cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.prompt + args.new))
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
        run_cache(model, prompt[:, :32], 4)  # warm-up
        results = {}
        for mode, fn in (("cache", run_cache), ("no cache", run_no_cache)):
            tokens, prefill, decode = fn(model, prompt, args.new)
            results[mode] = (tokens, prefill, decode)
        a, b = results["cache"][0], results["no cache"][0]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        base = (args.new - 1) / results["no cache"][2]
        for mode, (_, prefill, decode) in results.items():
            rate = (args.new - 1) / decode
            print(f"{name:10s} {mode:9s} {prefill:9.2f} {rate:12.1f} {args.new / (prefill + decode):16.2f} {rate / base:5.1f}x {agree:>3d}/{args.new}")


if __name__ == "__main__":
    main()
