"""`latentformer eval PATH --data DIR`: loss, perplexity and bits per byte over a whole split."""

from __future__ import annotations

import argparse
import json

HELP = "evaluate a checkpoint or run directory on a prepared data split (loss, perplexity, bits per byte)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory, or a run directory (its best, else latest, checkpoint)")
    parser.add_argument("--data", required=True, help="prepared data directory (from `latentformer prepare`)")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="split to evaluate (default: val)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (default: the training context, else the model's max_seq_len)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="autocast dtype (default: fp32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    import torch

    from latentformer.checkpoint import CONFIG, find_checkpoint, load
    from latentformer.data.dataset import TokenData
    from latentformer.data.tokenizer import check_vocab_fits
    from latentformer.train.distributed import best_device
    from latentformer.train.evaluate import evaluate

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such directory")
    data = TokenData(args.data)
    device = best_device() if args.device == "auto" else args.device
    ckpt = find_checkpoint(args.path)
    model, tokenizer = load(ckpt, device=device)
    check_vocab_fits(data.meta, model.config.vocab_size)
    same = ("kind", "vocab_size", "sha256")
    if [tokenizer.describe().get(k) for k in same] != [data.tokenizer.describe().get(k) for k in same]:
        raise ValueError(f"{ckpt} was trained with another tokenizer than {args.data} ({tokenizer.kind} vs {data.tokenizer.kind}); "
                         "prepare the data with the checkpoint's tokenizer directory")
    # default context: what the run trained at (config.json `train_seq_len`), else max_seq_len
    seq_len = args.seq_len or json.loads((ckpt / CONFIG).read_text()).get("train_seq_len") or model.config.max_seq_len
    if not 0 < seq_len <= model.config.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, {model.config.max_seq_len}], got {seq_len}")
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    result = evaluate(model, data.tokens(args.split), batch_size=args.batch_size, seq_len=seq_len,
                      bytes_per_token=data.bytes_per_token(args.split), device=device, autocast=autocast)
    result = {"checkpoint": str(ckpt), "split": args.split, "seq_len": seq_len, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ckpt} on {args.data} [{args.split}]: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"bits/byte {result['bpb']:.4f}  ({result['tokens']:,} tokens, context {seq_len})")
    return 0
