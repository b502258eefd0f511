"""`latentformer chat`: an interactive loop on stdin with a checkpoint.

The conversation is kept as a list of messages and rendered each turn with the model's chat
template, or the plain "User: ... / Assistant: ..." transcript for base models
(`latentformer.infer.chat`); the prompt is truncated from the left to fit the context. A reply
ends at end-of-text, at the template's stop string or after --max-new-tokens; an empty reply with
--stop given prints a hint once (a stop string that opens the reply). /reset forgets the
conversation, /quit (or end of input) ends the session.
"""

from __future__ import annotations

import argparse
import sys

from latentformer.cli.generate import add_model_arguments, add_sampling_arguments, flag_names, load_from_args, sampling_kwargs

HELP = "chat with a checkpoint on the terminal (/reset clears the conversation, /quit exits)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=128)


@flag_names()
def run(args: argparse.Namespace) -> int:
    from latentformer.infer.chat import chat_stops, has_template, render_chat
    from latentformer.infer.generate import generate

    model, tokenizer = load_from_args(args)
    kwargs = sampling_kwargs(args)
    own_stops = kwargs["stop"] or []
    kwargs["stop"] = [*chat_stops(tokenizer), *own_stops]
    hinted = False
    print(f"chat with {args.path} ({model.config.max_seq_len} tokens of context); /reset, /quit", flush=True)
    if not has_template(tokenizer):
        print("note: this is a base model without a chat template: replies continue a plain "
              "'User: ... / Assistant:' transcript", flush=True)
    messages: list[dict[str, str]] = []
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            print()
            return 0
        if message == "/quit":
            return 0
        if message == "/reset":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        if not message:
            continue
        messages.append({"role": "user", "content": message})
        reply = []
        for piece in generate(model, tokenizer, render_chat(tokenizer, messages), stream=True, truncate=True, **kwargs):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        text = "".join(reply).strip()
        if not text and own_stops and not hinted:  # once: `--stop "\n\n"` on a base model ends every reply at once
            hinted = True
            print(f"note: empty reply: a --stop string ({', '.join(map(repr, own_stops))}) may match at its very start "
                  "(a base model often opens a reply with newlines); drop --stop or give one that cannot open a reply",
                  file=sys.stderr, flush=True)
        messages.append({"role": "assistant", "content": text})
