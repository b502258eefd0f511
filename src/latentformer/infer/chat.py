"""Chat prompts: a list of messages -> the prompt text a model continues.

A tokenizer that carries its own chat template (`tokenizer.chat_template`, a Jinja string in
the Hugging Face convention, kept by imported models) renders it, in a sandboxed Jinja
environment as transformers does. Without one (models trained here are base models) the
plain transcript below is used:

    System: {content}          (only if a system message is given)
    User: {content}
    Assistant: {content}
    ...
    Assistant:                  (the generation prompt)

A reply in the plain format ends at the model's end-of-text or at the next "\\nUser:".

Training on conversations (`encode_chat`, used by `latentformer finetune`) renders them with the
same template and marks the tokens a fine-tuned model learns to write: each assistant turn's content
and its end-of-turn marker. A template's assistant turn is the text between the generation prompt
(`render(messages[:i], add_generation_prompt=True)`) and the end of `render(messages[:i+1])`; its
end-of-turn marker is the last stop token (`tokenizer.stop_ids`) in that text, and what the template
writes after it (ChatML's newline after <|im_end|>) belongs to the next turn's header. The plain
transcript writes no stop token: its assistant turn, " {content}\\n", is learned whole, and after a
conversation whose last turn wrote no stop token the end-of-text id is appended and learned too, so
a fine-tuned base model ends its replies with it (where `chat` and `serve` stop).
"""

from __future__ import annotations

from functools import lru_cache

ROLES = ("system", "user", "assistant")
PLAIN_LABELS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
PLAIN_STOP = "\nUser:"


def has_template(tokenizer) -> bool:
    """True when the tokenizer brings its own chat template (an instruction-tuned model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages) -> list[dict[str, str]]:
    """Validate `messages` ([{"role": ..., "content": str}, ...]); ValueError names the first bad one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer, messages, add_generation_prompt: bool = True) -> str:
    """The prompt for `messages`: the tokenizer's chat template if it has one, else the plain transcript."""
    messages = check_messages(messages)
    if has_template(tokenizer):
        return _render_template(tokenizer, messages, add_generation_prompt)
    lines = [f"{PLAIN_LABELS[m['role']]} {m['content']}\n" for m in messages]
    return "".join(lines) + (PLAIN_LABELS["assistant"] if add_generation_prompt else "")


def chat_stops(tokenizer) -> list[str]:
    """Stop strings that end an assistant reply (besides the tokenizer's end-of-text id)."""
    return [] if has_template(tokenizer) else [PLAIN_STOP]


def encode_chat(tokenizer, messages) -> tuple[list[int], list[bool]]:
    """The token ids of a whole conversation for training, and for each id whether it is one the model
    learns to write (an assistant turn's content or end-of-turn marker; see the module doc).

    The text is encoded piece by piece, cut where assistant turns start and end, so the marks are exact
    whatever the tokenizer merges; the piece before the first turn is encoded exactly as `render_chat`
    and `encode` encode that turn's prompt. ValueError for a conversation without an assistant turn, one
    that opens with one, and a template that renders a turn differently once later turns follow (its
    assistant tokens cannot be located then)."""
    messages = check_messages(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("the conversation has no assistant turn (nothing to learn)")
    if turns[0] == 0:
        raise ValueError("messages[0] is an assistant turn: a conversation opens with a system or user message")
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    ids: list[int] = []
    marks: list[bool] = []
    done, stopped = 0, False  # characters of `full` encoded so far; whether the last turn wrote a stop token
    for i in turns:
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (len(prompt) >= done and upto.startswith(prompt) and full.startswith(upto)):
            raise ValueError(f"the chat template renders messages[{i}] differently once later turns follow, "
                             "so its assistant tokens cannot be located")
        header, turn = tokenizer.encode(full[done:len(prompt)]), tokenizer.encode(full[len(prompt):len(upto)])
        stops = [k for k, t in enumerate(turn) if t in tokenizer.stop_ids]
        stopped = bool(stops)
        counted = stops[-1] + 1 if stops else len(turn)  # through the end-of-turn marker
        ids += header + turn
        marks += [False] * len(header) + [True] * counted + [False] * (len(turn) - counted)
        done = len(upto)
    tail = tokenizer.encode(full[done:])
    ids += tail
    marks += [False] * len(tail)
    if not stopped and turns[-1] == len(messages) - 1:  # the plain transcript: end the reply with end-of-text
        ids.append(tokenizer.eot_id)
        marks.append(True)
    return ids, marks


@lru_cache(maxsize=8)
def _compiled(template: str):
    """The sandboxed Jinja template (compiled once: a fine-tuning run renders every turn of every conversation)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render_template(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        template = _compiled(tokenizer.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=getattr(tokenizer, "bos_token", "") or "",
                               eos_token=getattr(tokenizer, "eos_token", "") or "")
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat template failed: {e}") from None
