"""`latentformer generate`: complete one or more prompts with a checkpoint."""

from __future__ import annotations

import argparse
import sys

HELP = "complete prompts with a trained checkpoint (batched, sampling controls, stop strings, streaming)"

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser, path_optional: bool = False) -> None:
    """PATH, --device and --dtype: shared by generate, chat and info."""
    parser.add_argument("path", nargs="?" if path_optional else None,
                        help="checkpoint directory, or a run directory (its best, else latest, checkpoint)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights and cache dtype (default: as loaded, float32)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Sampling flags shared by generate and chat (defaults as in `latentformer.generate`)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to generate per prompt (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0 = off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (default: 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on tokens already present, > 0 (default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR", help="stop strings (cut from the output)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA only)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop or None,
                compile=args.compile)


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) from PATH/--device/--dtype."""
    import torch

    from latentformer.checkpoint import load

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load(args.path, device=args.device, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for a batch")
    add_sampling_arguments(parser, max_new_tokens=64)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (several prompts: one after another)")
    parser.add_argument("--truncate", action="store_true", help="keep the last tokens of a prompt too long for the context")


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
