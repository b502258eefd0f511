"""`latentformer tokenizer`: train a byte-level BPE, or encode/decode text for debugging."""

from __future__ import annotations

import argparse
import json

HELP = "train a byte-level BPE tokenizer (train) or inspect tokenization (encode, decode)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a source's training split and save tokenizer.json")
    t.add_argument("--source", required=True, help="any `prepare --source` value")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (>= 257)")
    t.add_argument("--out", required=True, help="output tokenizer.json path")
    t.add_argument("--text-field", default="text")
    t.add_argument("--gutenberg-mirror", default=None)
    t.add_argument("--val-fraction", type=float, default=None, help="hold out the same validation documents as prepare (default 0.02)")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--force", action="store_true", help="replace an existing tokenizer file at --out")
    spec = "gpt2 | byte | tokenizer.json | a prepared data, checkpoint or run directory (default: gpt2)"
    e = sub.add_parser("encode", help="print the ids of TEXT")
    e.add_argument("--tokenizer", default="gpt2", help=spec)
    e.add_argument("text")
    d = sub.add_parser("decode", help="print the text of IDS")
    d.add_argument("--tokenizer", default="gpt2", help=spec)
    d.add_argument("ids", nargs="+", type=int)


def tokenizer_from(spec: str):
    """`load_tokenizer(spec)`, where a run directory stands for its checkpoint's tokenizer (as PATH does
    for generate and eval)."""
    from pathlib import Path

    from latentformer.checkpoint import find_checkpoint
    from latentformer.data.tokenizer import META_FILE, load_tokenizer

    p = Path(spec)
    if p.is_dir() and not (p / META_FILE).is_file() and (p / "checkpoints").is_dir():
        return load_tokenizer(find_checkpoint(p))
    return load_tokenizer(spec)


def _check_ids(ids: list[int], tok) -> None:
    bad = next((i for i in ids if not 0 <= i < tok.vocab_size), None)
    if bad is not None:
        raise ValueError(f"id {bad} is out of range for the {tok.kind} tokenizer (ids are 0 .. {tok.vocab_size - 1})")


def _check_out(out, source) -> None:
    """--out may replace only a tokenizer file (with --force), never a file of the source."""
    from latentformer.data.tokenizer import load_tokenizer

    for p in source.paths():
        if out.resolve() == p.resolve() or p.resolve() in out.resolve().parents:
            raise ValueError(f"--out {out} is or lies inside the source {source.spec!r}: choose another path")
    if out.exists():
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory: give a file path such as {out / 'tokenizer.json'}")
        try:
            load_tokenizer(out)
        except ValueError:
            raise ValueError(f"--out {out} exists and is not a tokenizer file: choose another path (nothing was changed)") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.action == "encode":
        tok = tokenizer_from(args.tokenizer)
        ids = tok.encode(args.text)
        print(json.dumps(ids))
        print(json.dumps([tok.decode([i]) for i in ids], ensure_ascii=False))
        return 0
    if args.action == "decode":
        tok = tokenizer_from(args.tokenizer)
        _check_ids(args.ids, tok)
        print(tok.decode(args.ids))
        return 0

    from latentformer.data.prepare import DEFAULT_VAL_FRACTION, split_documents
    from latentformer.data.sources import open_source
    from latentformer.data.tokenizer import train_bpe

    from latentformer.fsutil import atomic_write_text

    src = open_source(args.source, text_field=args.text_field, gutenberg_mirror=args.gutenberg_mirror)
    out = Path(args.out)
    _check_out(out, src)
    if out.exists() and not args.force:
        raise ValueError(f"--out {out} exists: pass --force to replace it")
    val = split_documents(src.doc_ids(), val_fraction=args.val_fraction or DEFAULT_VAL_FRACTION, seed=args.seed)
    tok = train_bpe((d.text for d in src.documents() if d.id not in val and d.text), args.vocab_size)
    atomic_write_text(out, tok.to_json())
    print(f"{out}: byte-level BPE, vocab {tok.vocab_size}, eot id {tok.eot_id}")
    return 0
