"""encode_chat: which tokens of a rendered conversation a fine-tuned model learns, checked token by token
against the rendered text: every assistant-content token and its end-of-turn marker, nothing of the
system or user turns or of the template's headers. With SmolLM2-135M-Instruct's own ChatML template
(on a small tokenizer with its special tokens) and with the plain transcript of a base model."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from latentformer.data.tokenizer import PretrainedTokenizer, load_tokenizer
from latentformer.infer.chat import encode_chat, render_chat

# SmolLM2-135M-Instruct's chat template, as its GGUF file carries it
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                 "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Who delivered the address of 1862?"},
                {"role": "assistant", "content": "President Lincoln delivered it."},
                {"role": "user", "content": "How long is it?"},
                {"role": "assistant", "content": "About 8,400 words."}]


@pytest.fixture(scope="module")
def chatml():
    """A byte-level BPE with ChatML's special tokens and SmolLM2's template and eos."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([m["content"] for m in CONVERSATION] * 20 + ["system user assistant"] * 20, trainer)
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "eos_token_id": tk.token_to_id("<|im_end|>")}
    return PretrainedTokenizer(tk, special, chat_template=SMOL_TEMPLATE)


def expected_marks(tokenizer, ids: list[int], text: str, spans: list[tuple[int, int]]) -> list[bool]:
    """Token i is learned iff the text it decodes to lies inside one of `spans` (character ranges)."""
    offsets = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]
    assert tokenizer.decode(ids) == text
    return [any(a <= offsets[i] and offsets[i + 1] <= b for a, b in spans) for i in range(len(ids))]


def test_chatml_learns_assistant_contents_and_their_end_of_turn_only(chatml):
    ids, marks = encode_chat(chatml, CONVERSATION)
    text = render_chat(chatml, CONVERSATION, add_generation_prompt=False)
    assert ids == chatml.encode(text)  # cut at the turns, encoded as the whole text would be
    spans = []
    for m in CONVERSATION[2::2]:
        start = text.index(f"<|im_start|>assistant\n{m['content']}<|im_end|>") + len("<|im_start|>assistant\n")
        spans.append((start, start + len(m["content"]) + len("<|im_end|>")))
    assert marks == expected_marks(chatml, ids, text, spans)
    learned = [chatml.decode([i]) for i, m in zip(ids, marks) if m]
    assert "".join(learned) == "President Lincoln delivered it.<|im_end|>About 8,400 words.<|im_end|>"
    # the newline ChatML writes after <|im_end|> opens the next turn: not learned
    im_end = chatml.encode("<|im_end|>")[0]
    assert [marks[i + 1] for i, t in enumerate(ids[:-1]) if t == im_end] == [False] * 5


def test_chatml_prompt_tokens_are_the_generation_prompt(chatml):
    """The tokens before the first learned one are exactly what `chat` sends to ask for that reply."""
    ids, marks = encode_chat(chatml, CONVERSATION)
    prompt = chatml.encode(render_chat(chatml, CONVERSATION[:2], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt and marks.index(True) == len(prompt)


def test_plain_transcript_of_a_base_model():
    tok = load_tokenizer("byte")  # one token per character: the marks read off the text directly
    ids, marks = encode_chat(tok, CONVERSATION)
    text = render_chat(tok, CONVERSATION, add_generation_prompt=False)
    assert ids[:-1] == tok.encode(text) and ids[-1] == tok.eot_id and marks[-1]
    spans = [(text.index(f"Assistant: {m['content']}\n") + len("Assistant:"),
              text.index(f"Assistant: {m['content']}\n") + len(f"Assistant: {m['content']}\n")) for m in CONVERSATION[2::2]]
    assert marks[:-1] == expected_marks(tok, ids[:-1], text, spans)
    assert tok.decode([i for i, m in zip(ids, marks) if m]) == " President Lincoln delivered it.\n About 8,400 words.\n<|endoftext|>"


def test_no_end_of_text_after_a_trailing_user_turn():
    ids, marks = encode_chat(load_tokenizer("byte"), CONVERSATION[:4])
    assert ids[-1] != 256 and not any(marks[-len("User: How long is it?\n"):])


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "messages[0] is an assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages[1].content must be a string"),
])
def test_conversations_without_something_to_learn_are_refused(chatml, messages, error):
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        encode_chat(chatml, messages)


def test_a_template_that_rewrites_earlier_turns_is_refused(chatml):
    """Templates that drop earlier turns' reasoning (Qwen3-style) cannot be cut turn by turn."""
    chatml.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and not loop.last %}"
                            "[...]{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    try:
        with pytest.raises(ValueError, match=r"renders messages\[2\] differently once later turns follow"):
            encode_chat(chatml, CONVERSATION)
    finally:
        chatml.chat_template = SMOL_TEMPLATE
