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
"""

from __future__ import annotations

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


def _render_template(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(tokenizer.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=getattr(tokenizer, "bos_token", "") or "",
                               eos_token=getattr(tokenizer, "eos_token", "") or "")
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat template failed: {e}") from None
