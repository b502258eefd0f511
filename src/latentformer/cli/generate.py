"""`latentformer generate`: complete one or more prompts with a checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys

HELP = "complete prompts with a trained checkpoint (batched, sampling controls, stop strings, streaming)"

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, path_optional: bool = False) -> None:
    """PATH, --device and --dtype: shared by generate, chat and info."""
    parser.add_argument("path", nargs="?" if path_optional else None,
                        help="checkpoint directory, or a run directory (its best, else latest, checkpoint)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights and cache dtype (default: as loaded, float32)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Sampling flags shared by generate and chat (defaults as in `latentformer.generate`)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to generate per prompt (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (default: 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on tokens already present, > 0 (default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling, in [0, 2^64)")
    parser.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR",
                        help=r"stop strings (cut from the output); \n, \t, \r and \\ are escapes, so --stop '\n\n' is a blank line")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA only)")


SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2^64)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` as the characters they name (a shell passes "\n" as two characters);
    any other backslash stays as written."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags as `generate` keywords, each checked to a range sampling can follow
    (ValueError naming the flag)."""
    from latentformer.infer.sampling import SamplingParams

    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be in [0, 2^64), got {args.seed}")
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    except ValueError as e:  # "top_p must be ..." -> "--top-p must be ..."
        field, rest = str(e).split(" ", 1)
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=[unescape(s) for s in args.stop] or None, compile=args.compile)


def check_device(spec: str, flag: str = "--device") -> str:
    """`spec` if it names a device this machine has (cpu, cuda, cuda:N, mps), else ValueError naming `flag`."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {spec!r} is not a device: expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec}: CUDA is not available on this machine (no GPU, or a CPU-only torch); "
                             f"use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {spec}: MPS is not available on this machine; use {flag} cpu")
    elif dev.type != "cpu":
        raise ValueError(f"{flag} {spec!r}: unsupported device type {dev.type!r} (expected cpu, cuda, cuda:N or mps)")
    return spec


def load_from_args(args: argparse.Namespace, check_finite: bool = True):
    """(model, tokenizer) from PATH/--device/--dtype; `check_finite` refuses non-finite weights."""
    import torch

    from latentformer.checkpoint import load

    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = check_device(args.device) if args.device is not None else None
    return load(args.path, device=device, dtype=dtype, check_finite=check_finite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for a batch")
    add_sampling_arguments(parser, max_new_tokens=64)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (several prompts: one after another)")
    parser.add_argument("--truncate", action="store_true", help="keep the last tokens of a prompt too long for the context")


@contextlib.contextmanager
def flag_names():
    """A prompt that does not fit the context, worded with the command's flags."""
    from latentformer.infer.generate import PromptTooLong

    try:
        yield
    except PromptTooLong as e:
        raise ValueError(e.worded("--max-new-tokens {}", "--truncate")) from None


@flag_names()
def run(args: argparse.Namespace) -> int:
    from latentformer.infer.generate import generate

    model, tokenizer = load_from_args(args)
    kwargs = dict(sampling_kwargs(args), truncate=args.truncate)
    prompts = args.prompt
    if args.stream:
        for i, prompt in enumerate(prompts):
            it = generate(model, tokenizer, prompt, stream=True, **kwargs)  # validates before printing
            if i:
                print("\n---")
            sys.stdout.write(prompt)
            for piece in it:
                sys.stdout.write(piece)
                sys.stdout.flush()
        print()
        return 0
    completions = generate(model, tokenizer, prompts, **kwargs)
    print("\n---\n".join(p + c for p, c in zip(prompts, completions)))
    return 0
