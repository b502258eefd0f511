"""Conversation files for fine-tuning: both formats, errors that name the line, the held-out split by
content, padded rows with assistant-only targets, batches that resume exactly, padding trimmed."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from latentformer.data.chat_demo import demo_conversations
from latentformer.data.conversations import ChatData
from latentformer.data.dataset import trim_padding
from latentformer.data.tokenizer import load_tokenizer
from latentformer.infer.chat import encode_chat

BYTE = load_tokenizer("byte")


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_prompt_completion_equals_the_same_messages(tmp_path):
    as_messages = [chat("2+2?", "4"), chat("3+3?", "6")]
    as_pairs = [{"prompt": "2+2?", "completion": "4"},
                {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "6"}]}]
    a = ChatData(write(tmp_path / "a.jsonl", as_messages), BYTE, 64)
    b = ChatData(write(tmp_path / "b.jsonl", as_pairs + [""]), BYTE, 64)  # a blank line is skipped
    for split in ("train", "val"):
        assert [(i.tolist(), lab.tolist()) for i, lab in a.splits[split]] == [(i.tolist(), lab.tolist()) for i, lab in b.splits[split]]


@pytest.mark.parametrize("lines, error", [
    ([], "no conversations (the file is empty)"),
    ([chat("a", "b"), chat("c", "d"), '{"messages": [}'], ":3: not valid JSON: "),
    ([chat("a", "b"), {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}],
     ":2: messages[0].role must be one of system, user, assistant, got None"),
    ([chat("a", "b"), {"messages": [{"role": "user", "content": "only a question"}]}],
     ":2: the conversation has no assistant turn (nothing to learn)"),
    ([{"text": "plain text"}], ':1: expected an object with "messages", or with "prompt" and "completion"'),
    ([chat("a", "b"), chat("a long question " * 10, "b")], ":2: the conversation is 181 tokens, longer than the context of 64 tokens"),
    ([chat("a", "b")], "1 conversation: at least 2 are needed"),
])
def test_bad_files_name_the_line(tmp_path, lines, error):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as e:
        ChatData(path, BYTE, 64)
    assert error in str(e.value) and str(e.value).startswith(path) and "\n" not in str(e.value)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(chat("a", "b")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text"):
        ChatData(path, BYTE, 64)


def test_held_out_split_depends_on_content_not_order(tmp_path):
    records = demo_conversations(40)
    a = ChatData(write(tmp_path / "a.jsonl", records), BYTE, 1024, val_fraction=0.1)
    b = ChatData(write(tmp_path / "b.jsonl", records[::-1]), BYTE, 1024, val_fraction=0.1)
    assert len(a.splits["val"]) == 4 and len(a.splits["train"]) == 36
    assert sorted(i.tolist() for i, _ in a.splits["val"]) == sorted(i.tolist() for i, _ in b.splits["val"])
    assert sorted(map(str, a.messages["val"])) == sorted(map(str, b.messages["val"]))


def test_rows_are_padded_with_assistant_only_targets(tmp_path):
    data = ChatData(write(tmp_path / "c.jsonl", [chat("hi", "yo"), chat("question", "answer")]), BYTE, 64)
    x, y, n = next(iter(data.eval_batches("val", 4, 64)))
    (ids, labels), = data.splits["val"]
    expect_ids, marks = encode_chat(BYTE, data.messages["val"][0])
    assert ids.tolist() == expect_ids and n == sum(marks)
    L = len(ids) - 1
    assert x[0, :L].tolist() == expect_ids[:-1] and (x[0, L:] == BYTE.eot_id).all()
    assert y[0, :L].tolist() == [t if m else -100 for t, m in zip(expect_ids[1:], marks[1:])] and (y[0, L:] == -100).all()


def test_batches_cover_the_epochs_sort_by_length_and_resume_from_their_count(tmp_path):
    data = ChatData(write(tmp_path / "d.jsonl", demo_conversations(18)), BYTE, 1024, val_fraction=0.1)
    n = len(data.splits["train"])
    assert n == 16  # a window of GROUP = 8 batches of 8 is 4 epochs: every conversation 4 times
    it = data.train_batches(batch_size=8, block_size=1024, seed=3)
    batches = [next(it) for _ in range(8)]
    seen = Counter(tuple(r[r != -100].tolist()) for _, y in batches for r in y)
    assert len(seen) == n and set(seen.values()) == {4}
    lengths = [sorted(int((x != BYTE.eot_id).sum()) for x in xs) for xs, _ in batches]
    assert sorted(lengths) == [sorted(sum(lengths, []))[8 * i : 8 * (i + 1)] for i in range(8)]  # sorted, then cut
    assert lengths != sorted(lengths)  # the window's batches come shuffled
    state = it.state_dict()
    after = [next(it) for _ in range(3)]
    resumed = data.train_batches(batch_size=8, block_size=1024, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(after, (next(resumed) for _ in range(3))))
    with pytest.raises(ValueError, match="was the data file changed"):
        data.train_batches(8, 1024, seed=4).load_state_dict(state)


def test_trim_padding_keeps_every_counted_target():
    y = torch.full((2, 64), -100)
    y[0, 3:7] = 1
    y[1, 20] = 2
    x = torch.arange(128).view(2, 64)
    xt, yt = trim_padding(x, y)
    assert yt.shape == (2, 24) and torch.equal(xt, x[:, :24]) and (yt != -100).sum() == 5
    windows = torch.ones(2, 64, dtype=torch.int64)  # prepared tokens: every target counts
    assert trim_padding(windows, windows)[1].shape == (2, 64)


def test_demo_set_is_deterministic_and_in_both_formats():
    demo = demo_conversations()
    assert len(demo) == 200 and demo == demo_conversations()
    assert sum("prompt" in c for c in demo) == 40 and sum(len(c.get("messages", [])) == 4 for c in demo) == 40
    assert np.mean([c["messages"][-1]["content"].startswith("President") for c in demo if "messages" in c]) == 0.5
