"""`latentformer chat`: an interactive loop on stdin with a checkpoint.

The conversation is kept as a plain transcript ("User: ...\\nAssistant: ...\\n"), sent as the
prompt of every turn and truncated from the left to fit the context; a reply ends at
end-of-text, at the next "\\nUser:" or after --max-new-tokens. /reset forgets the
conversation, /quit (or end of input) ends the session.
"""

from __future__ import annotations

import argparse
import sys

from latentformer.cli.generate import add_model_arguments, add_sampling_arguments, load_from_args, sampling_kwargs

HELP = "chat with a checkpoint on the terminal (/reset clears the conversation, /quit exits)"

USER, ASSISTANT = "User:", "Assistant:"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=128)


def turn_prompt(history: str, message: str) -> str:
    """The prompt of one turn: the transcript so far plus the user's message."""
    return f"{history}{USER} {message}\n{ASSISTANT}"


def run(args: argparse.Namespace) -> int:
    from latentformer.infer.generate import generate

    model, tokenizer = load_from_args(args)
    kwargs = sampling_kwargs(args)
    kwargs["stop"] = [f"\n{USER}", *(kwargs["stop"] or [])]
    print(f"chat with {args.path} ({model.config.max_seq_len} tokens of context); /reset, /quit", flush=True)
    history = ""
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            print()
            return 0
        if message == "/quit":
            return 0
        if message == "/reset":
            history = ""
            print("(conversation cleared)", flush=True)
            continue
        if not message:
            continue
        prompt = turn_prompt(history, message)
        reply = []
        for piece in generate(model, tokenizer, prompt, stream=True, truncate=True, **kwargs):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        history = f"{prompt}{''.join(reply)}\n"
