"""`latentformer convert`: checkpoints to and from the Hugging Face (transformers) format."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

HELP = "convert a checkpoint to a Hugging Face directory (--to hf) or a Hugging Face checkpoint to ours (--from hf)"

_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf"], help="export SOURCE (a checkpoint or run directory) as a transformers checkpoint")
    way.add_argument("--from", dest="from_", choices=["hf"], help="import SOURCE (a transformers directory, or a hub id when no such path exists)")
    parser.add_argument("source", metavar="SOURCE", help="checkpoint/run directory (--to hf) or HF directory / hub id (--from hf)")
    parser.add_argument("out", metavar="OUT_DIR", help="output directory (replaced atomically)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--which", choices=["best", "latest"], default="best", help="with --to hf and a run directory: which checkpoint (default: best)")


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache) the safetensors files of a hub model; one-line errors."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise FileNotFoundError(f"no such directory: {repo_id}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{repo_id} is not a directory, and downloading it needs huggingface_hub (pip install 'latentformer[hf]')") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, etag_timeout=10))
    except Exception as e:  # hub/network errors come in many types; each becomes one line
        if offline:
            raise ValueError(f"{repo_id} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 (offline)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot download {repo_id} from the Hugging Face hub (offline or no such model?): {first}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from latentformer.checkpoint import find_checkpoint, load_model, save_checkpoint
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.interop.hf import export_hf, import_hf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.to:
            ckpt = find_checkpoint(args.source, args.which)
            model = load_model(ckpt)
            try:
                tokenizer = load_tokenizer(ckpt)
            except ValueError as e:
                tokenizer = None
                print(f"note: no tokenizer exported ({e})", file=sys.stderr)
            export_hf(model, tokenizer, args.out, dtype=args.dtype or "float32")
            print(f"wrote {args.out} ({_architecture(args.out)})")
        else:
            src = Path(args.source)
            hf_dir = src if src.exists() else _hub_snapshot(args.source)
            model, tokenizer = import_hf(hf_dir, dtype=getattr(torch, args.dtype) if args.dtype else None)
            save_checkpoint(args.out, model, tokenizer, extra={"converted_from": {"format": "hf", "source": str(args.source)}})
            print(f"wrote {args.out} ({model.config.attention}, {model.num_params():,} parameters"
                  f"{', no tokenizer' if tokenizer is None else ''})")
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return 0


def _architecture(out: str) -> str:
    import json

    return json.loads((Path(out) / "config.json").read_text())["architectures"][0]
