"""`latentformer convert`: checkpoints to and from the Hugging Face (transformers) format and GGUF files.

OUT is written atomically and never replaces what latentformer did not make: an existing non-empty
OUT must be an export (--to hf) or checkpoint (--from) directory made here, or a GGUF file exported
here (--to gguf), and needs --force; OUT
may never be or contain SOURCE. Every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

HELP = ("convert a checkpoint to a Hugging Face directory (--to hf) or a GGUF file for llama.cpp (--to gguf), a Hugging Face checkpoint "
        "(--from hf) or GGUF file (--from gguf) to ours, or an MHA/GQA checkpoint to MLA (--to-mla)")

_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "generation_config.json", "chat_template.jinja", "chat_template.json"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf", "gguf"],
                     help="export SOURCE (a checkpoint or run directory) as a transformers checkpoint (hf) or a GGUF file (gguf)")
    way.add_argument("--from", dest="from_", choices=["hf", "gguf"],
                     help="import SOURCE: a transformers directory (or a hub id when no such path exists), or a .gguf file")
    way.add_argument("--to-mla", action="store_true",
                     help="turn SOURCE (an MHA/GQA checkpoint or run directory) into an MLA checkpoint (see interop/to_mla.py)")
    parser.add_argument("source", metavar="SOURCE", help="checkpoint/run directory (--to hf/gguf), HF directory / hub id (--from hf), .gguf file (--from gguf)")
    parser.add_argument("out", metavar="OUT", help="output directory, or .gguf file with --to gguf (written atomically)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if this command made it before (never anything else)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "q8_0"], default=None,
                        help="dtype of the written weights (default: float32; --from gguf: bfloat16 for a quantized or "
                             "BF16 file, float32 for F32/F16; --to-mla: the source's); q8_0: --to gguf only")
    parser.add_argument("--which", choices=["best", "latest"], default="best", help="with --to hf / --to-mla and a run directory: which checkpoint (default: best)")
    parser.add_argument("--kv-fraction", type=float, default=None, metavar="F",
                        help="with --to-mla: keep this fraction of the source's KV cache per token (e.g. 0.5); "
                             "chooses the latent rank and rope dims that fit")
    parser.add_argument("--kv-lora-rank", "--rank", type=int, default=None, metavar="R",
                        help="with --to-mla: the latent's rank r instead (cache: r + rope dims values per token and layer)")
    parser.add_argument("--rope-dim", type=int, default=None, metavar="DR",
                        help="with --to-mla: dims of the shared rope key, even, <= head_dim (default: a third of the "
                             "cache per token and layer, at most head_dim)")
    parser.add_argument("--calib", default="samples,sotu",
                        help="with --to-mla: calibration text, comma-separated parts sharing --calib-tokens: samples "
                             "(text sampled from SOURCE itself), a corpus (sotu, shakespeare, docstrings), a text "
                             "file/directory, or a prepared data directory of the same tokenizer (default: samples,sotu)")
    parser.add_argument("--calib-tokens", type=int, default=32768, help="with --to-mla: calibration tokens (default: 32768)")
    parser.add_argument("--sequential", action="store_true",
                        help="with --to-mla: calibrate each layer on the activations of the model whose earlier layers "
                             "are already converted (measured 0-7%% better on SmolLM2 at 25%% and 50%% of its cache, for a "
                             "second forward over the calibration per conversion: README)")
    parser.add_argument("--eval", default="docstrings",
                        help="with --to-mla: held-out texts, comma-separated, on which the source's and the converted "
                             "model's perplexities are printed; a calibration part is read past its calibration tokens "
                             "(default: docstrings)")
    parser.add_argument("--eval-windows", type=int, default=4,
                        help="with --to-mla: windows of 513 tokens evaluated per text (0: no table; default: 4)")


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache) the safetensors files of a hub model; one-line errors."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise FileNotFoundError(f"no such directory: {repo_id}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    from huggingface_hub import snapshot_download  # installed with tokenizers, a dependency
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, etag_timeout=10))
    except Exception as e:  # hub/network errors come in many types; each becomes one line
        if offline:
            raise ValueError(f"{repo_id} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 (offline)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot download {repo_id} from the Hugging Face hub (offline or no such model?): {first}") from None


def _made_export(directory: Path) -> bool:
    """An export written before output markers existed: a Hugging Face config.json (not one of our
    checkpoints) beside the tokenizer_meta.json that only latentformer writes."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and "architectures" in config and (directory / "tokenizer_meta.json").is_file()


def run(args: argparse.Namespace) -> int:
    import torch

    from latentformer.checkpoint import find_checkpoint, load_model, write_model
    from latentformer.data.tokenizer import is_checkpoint_dir, load_tokenizer
    from latentformer.fsutil import atomic_directory, check_output, mark_output
    from latentformer.interop.hf import export_hf, import_hf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.to_mla:
            _to_mla(args)
            return _notes(caught)
        for flag, value in (("--kv-fraction", args.kv_fraction), ("--kv-lora-rank", args.kv_lora_rank), ("--rope-dim", args.rope_dim),
                            ("--sequential", args.sequential or None)):
            if value is not None:
                raise ValueError(f"{flag} applies to --to-mla only")
        if args.dtype == "q8_0" and args.to != "gguf":
            raise ValueError("--dtype q8_0 applies to --to gguf only")
        if args.to == "gguf":
            _to_gguf(args)
            return _notes(caught)
        if args.to:
            ckpt = find_checkpoint(args.source, args.which)
            check_output(args.out, "export", args.force, inputs=[args.source, ckpt], flag="OUT_DIR", recognise=_made_export)
            model = load_model(ckpt)
            try:
                tokenizer = load_tokenizer(ckpt)
            except ValueError as e:
                tokenizer = None
                print(f"note: no tokenizer exported ({e})", file=sys.stderr)
            export_hf(model, tokenizer, args.out, dtype=args.dtype or "float32")
            print(f"wrote {args.out} ({_architecture(args.out)})")
            return _notes(caught)
        src = Path(args.source)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        if args.from_ == "gguf":
            from latentformer.interop.gguf import import_gguf

            check_output(args.out, "checkpoint", args.force, inputs=[src], flag="OUT_DIR", recognise=is_checkpoint_dir)
            model, tokenizer = import_gguf(src, dtype=dtype)
        else:
            if src.exists() and not src.is_dir():
                raise ValueError(f"{src} is a file, not a Hugging Face model directory (a .gguf file? use --from gguf)")
            check_output(args.out, "checkpoint", args.force, inputs=[src], flag="OUT_DIR", recognise=is_checkpoint_dir)
            hf_dir = src if src.exists() else _hub_snapshot(args.source)
            model, tokenizer = import_hf(hf_dir, dtype=dtype)
        with atomic_directory(args.out) as tmp:
            write_model(tmp, model, tokenizer, extra={"converted_from": {"format": args.from_, "source": str(args.source)}})
            mark_output(tmp, "checkpoint")
        print(f"wrote {args.out} ({model.config.attention}, {model.num_params():,} parameters in "
              f"{str(model.embed.weight.dtype).removeprefix('torch.')}{', no tokenizer' if tokenizer is None else ''})")
    return _notes(caught)


def _to_gguf(args: argparse.Namespace) -> None:
    """--to gguf: OUT is a file; an existing one is replaced only with --force and only if this
    command wrote it (its GGUF metadata has `EXPORT_KEY`)."""
    from latentformer.checkpoint import find_checkpoint, load_model
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.interop.gguf import check_gguf, export_gguf, exported_gguf, gguf_architecture

    ckpt = find_checkpoint(args.source, args.which)
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"OUT {out} is a directory; --to gguf writes a file (e.g. {out / 'model.gguf'})")
    if out.exists() and not args.force:
        raise ValueError(f"OUT {out} exists (use --force to replace a GGUF file exported before)")
    if out.exists() and not exported_gguf(out):
        raise ValueError(f"OUT {out} is not a GGUF file exported by latentformer; not replaced, even with --force")
    model = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    check_gguf(model.config, tokenizer)
    export_gguf(model, tokenizer, out, dtype=args.dtype or "float32")
    print(f"wrote {out} ({gguf_architecture(model.config)}, {args.dtype or 'float32'}, {out.stat().st_size:,} bytes)")


def _to_mla(args: argparse.Namespace) -> None:
    """--to-mla: every check (source, sizes, tokenizer, calibration and held-out text, OUT) before the
    conversion; then a table of KV bytes and held-out perplexity, source and converted."""
    import torch

    from latentformer.checkpoint import find_checkpoint, load_model, read_config, write_model
    from latentformer.data.tokenizer import is_checkpoint_dir, load_tokenizer
    from latentformer.fsutil import atomic_directory, check_output, mark_output
    from latentformer.interop.to_mla import calibration_parts, calibration_tokens, mla_config, mla_shape, text_tokens, to_mla

    if args.calib_tokens <= 0:
        raise ValueError(f"--calib-tokens must be positive, got {args.calib_tokens}")
    if args.eval_windows < 0:
        raise ValueError(f"--eval-windows must be >= 0, got {args.eval_windows}")
    ckpt = find_checkpoint(args.source, args.which)
    cfg = read_config(ckpt)
    rank, rope_dim = mla_shape(cfg, rank=args.kv_lora_rank, kv_fraction=args.kv_fraction, rope_dim=args.rope_dim)
    mla_config(cfg, rank, rope_dim)  # its refusals (a rope the shorter key would change) before any work
    parts = calibration_parts(args.calib, args.calib_tokens)
    check_output(args.out, "checkpoint", args.force, inputs=[args.source, ckpt], flag="OUT_DIR", recognise=is_checkpoint_dir)
    try:
        tokenizer = load_tokenizer(ckpt)
    except ValueError as e:
        raise ValueError(f"--to-mla tokenizes the calibration text with the source's tokenizer: {e}") from None
    model = load_model(ckpt, dtype=getattr(torch, args.dtype) if args.dtype else None)
    dtype = model.embed.weight.dtype
    model = model.float()  # sampling, statistics (fp64) and conversion in fp32
    window = min(512, cfg.max_seq_len)
    held_out = {spec: text_tokens(spec, tokenizer, args.eval_windows * window + 1, cfg.vocab_size, skip=parts.get(spec, 0), flag="--eval")
                for spec in (s.strip() for s in args.eval.split(",")) if args.eval_windows}
    for spec, tokens in held_out.items():
        if tokens.numel() < 2:
            raise ValueError(f"--eval {spec}: no tokens left past the calibration's")
    with _phases() as progress:
        tokens = calibration_tokens(args.calib, model, tokenizer, args.calib_tokens, progress)
        how = " sequentially, converting" if args.sequential else ", then converting"
        print(f"--to-mla: calibrating on {tokens.numel():,} tokens{how} {cfg.n_layers} layers", file=sys.stderr, flush=True)
        mla = to_mla(model, tokens, rank, rope_dim, sequential=args.sequential, progress=progress).to(dtype)
    with atomic_directory(args.out) as tmp:
        write_model(tmp, mla, tokenizer, extra={"converted_from": {"format": "to-mla", "source": str(ckpt),
                                                               "calib": args.calib, "calib_tokens": int(tokens.numel())}})
        mark_output(tmp, "checkpoint")
    # per token over all layers, in bf16 as the README states cache sizes, whatever the saved dtype
    before, after = model.kv_cache_bytes_per_token(torch.bfloat16), mla.kv_cache_bytes_per_token(torch.bfloat16)
    print(f"wrote {args.out} (mla, kv_lora_rank {rank}, rope dims {rope_dim}): KV cache {before:,} -> {after:,} bytes per token "
          f"in bfloat16 ({1 - after / before:.1%} saved)")
    if held_out:
        _print_table(model, mla.float(), held_out, window)


def _print_table(source, converted, held_out: dict, window: int) -> None:
    """Source and converted: KV bytes per token (bf16, all layers) and perplexity on each held-out
    text (the converted model's weights as written, computed in fp32)."""
    import torch

    from latentformer.train.evaluate import evaluate

    texts = list(held_out)
    windows = {spec: -(-(t.numel() - 1) // window) for spec, t in held_out.items()}
    head = ["model", "KV bytes/token (bf16)", *(f"ppl {s} ({windows[s]} x {window + 1} tokens)" for s in texts)]
    rows, base = [], {}
    for name, model in ((f"source ({source.config.attention})", source), ("converted (mla)", converted)):
        ppl = {s: evaluate(model, t.numpy(), batch_size=4, seq_len=window, bytes_per_token=1.0)["perplexity"] for s, t in held_out.items()}
        base = base or ppl
        kv = model.kv_cache_bytes_per_token(torch.bfloat16)
        rows.append([name, f"{kv:,}", *(f"{ppl[s]:.2f}" + ("" if model is source else f" ({ppl[s] / base[s]:.2f}x)") for s in texts)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@contextlib.contextmanager
def _phases():
    """A rich progress bar on a terminal (stderr), one task per phase of the conversion; a phase
    factory for `to_mla(progress=...)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=not console.is_terminal) as bar:
        def phase(name: str):
            task = bar.add_task(name, total=None)
            return lambda done, total: bar.update(task, completed=done, total=total)

        yield phase


def _notes(caught: list[warnings.WarningMessage]) -> int:
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return 0


def _architecture(out: str) -> str:
    return json.loads((Path(out) / "config.json").read_text())["architectures"][0]
