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
    e = sub.add_parser("encode", help="print the ids of TEXT")
    e.add_argument("--tokenizer", default="gpt2")
    e.add_argument("text")
    d = sub.add_parser("decode", help="print the text of IDS")
    d.add_argument("--tokenizer", default="gpt2")
    d.add_argument("ids", nargs="+", type=int)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from latentformer.data.tokenizer import load_tokenizer

    if args.action == "encode":
        tok = load_tokenizer(args.tokenizer)
        ids = tok.encode(args.text)
        print(json.dumps(ids))
        print(json.dumps([tok.decode([i]) for i in ids], ensure_ascii=False))
        return 0
    if args.action == "decode":
        print(load_tokenizer(args.tokenizer).decode(args.ids))
        return 0

    from latentformer.data.prepare import DEFAULT_VAL_FRACTION, split_documents
    from latentformer.data.sources import open_source
    from latentformer.data.tokenizer import train_bpe

    src = open_source(args.source, text_field=args.text_field, gutenberg_mirror=args.gutenberg_mirror)
    val = split_documents(src.doc_ids(), val_fraction=args.val_fraction or DEFAULT_VAL_FRACTION, seed=args.seed)
    tok = train_bpe((d.text for d in src.documents() if d.id not in val and d.text), args.vocab_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(tok.to_json())
    tmp.replace(out)
    print(f"{out}: byte-level BPE, vocab {tok.vocab_size}, eot id {tok.eot_id}")
    return 0
