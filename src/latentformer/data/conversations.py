"""Conversation data for fine-tuning: a JSONL file of chats -> padded rows with assistant-only targets.

Each line of the file is one conversation, in either format that trl's SFTTrainer reads:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}     a user turn and the reply; either side may also be a
                                               list of messages (trl's conversational prompt/completion)

Blank lines are skipped. A conversation is rendered with the model's chat template (or the plain
transcript of a base model) and encoded by `latentformer.infer.chat.encode_chat`, which marks the
tokens the model learns: assistant contents and their end-of-turn markers. Every error names the
file and line.

Rows (shapes: B conversations, T = block_size): one conversation per row, right-padded to T,
x[b] = ids[:-1], y[b] = ids[1:] where the target is learned, else -100 (the loss's ignore index);
padding has x = end-of-text, y = -100. Right padding needs no attention mask under causal attention
(no real token sees a later position) and each row starts at position 0, so the model, its attention
kernels and its rope run unchanged; NOTES.md ("Fine-tuning") says why padding rather than packing.
The trainer cuts the columns after a micro-batch's last learned target (`dataset.trim_padding`).

The held-out split is by content: the conversations whose line text has the smallest sha256 go to
validation (`val_fraction` of them, at least one), whatever the order of the file or the seed. The
training order is a fresh permutation per epoch, `np.random.default_rng([seed, 1, epoch])`, read as
one endless stream of conversations and cut into windows of GROUP batches; a window's conversations
are sorted by length before they are cut into its batches, which then come in a shuffled order
(`default_rng([seed, 2, window])`): rows of a batch have similar lengths, so less padding (on the
demonstration set, 90% of the positions are real tokens against 72% unsorted; NOTES.md), while the
order stays random at the scale of a window. Batch k is a pure function of (seed, k): resuming from
the count alone yields exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from latentformer.model.transformer import IGNORE_INDEX

GROUP = 8  # batches per window of length-sorted conversations (module doc)


def read_conversations(path: str | Path) -> list[tuple[int, str, list[dict]]]:
    """(line number, line text, messages) of every conversation in the JSONL file; ValueError naming
    the file and line for anything else: bad JSON or UTF-8, a record of neither format, a bad role."""
    from latentformer.infer.chat import check_messages

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (conversations are read from a JSONL file)")
    out = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {e.start})") from None
            if not line:
                continue
            try:
                record = json.loads(line)
                out.append((number, line, check_messages(_messages(record))))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON: {e}") from None
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no conversations (the file is empty)")
    return out


def _messages(record) -> list:
    """The message list of one record, in either format (validated by the caller)."""
    if isinstance(record, dict) and "messages" in record:
        return record["messages"]
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise ValueError("prompt and completion must be strings or lists of messages")
        return prompt + completion
    raise ValueError('expected an object with "messages", or with "prompt" and "completion"')


class ChatData:
    """A JSONL file of conversations, encoded with `tokenizer`, split into "train" and "val".

    The data source the trainer takes for conversation data (as `TokenData` for prepared tokens):
    `tokenizer`, `train_batches`, `eval_batches`, `bytes_per_token`. `seq_len`: the longest
    conversation allowed (tokens); a longer one is a ValueError naming its line."""

    def __init__(self, path: str | Path, tokenizer, seq_len: int, val_fraction: float = 0.1) -> None:
        from latentformer.infer.chat import encode_chat

        self.path, self.tokenizer = Path(path), tokenizer
        records = read_conversations(self.path)
        if len(records) < 2:
            raise ValueError(f"{self.path}: {len(records)} conversation: at least 2 are needed (training and validation)")
        encoded = []
        for number, line, messages in records:
            try:
                ids, marks = encode_chat(tokenizer, messages)
            except ValueError as e:
                raise ValueError(f"{self.path}:{number}: {e}") from None
            if len(ids) > seq_len:
                raise ValueError(f"{self.path}:{number}: the conversation is {len(ids)} tokens, longer than the "
                                 f"context of {seq_len} tokens")
            ids_a = np.asarray(ids, dtype=np.int64)
            encoded.append((hashlib.sha256(line.encode("utf-8")).hexdigest(), ids_a,
                            np.where(np.asarray(marks), ids_a, IGNORE_INDEX)))
        n_val = min(len(encoded) - 1, max(1, round(val_fraction * len(encoded))))
        held = set(sorted(range(len(encoded)), key=lambda i: encoded[i][0])[:n_val])
        self.splits = {"train": [e[1:] for i, e in enumerate(encoded) if i not in held],
                       "val": [e[1:] for i, e in enumerate(encoded) if i in held]}
        self.messages = {"train": [m for i, (_, _, m) in enumerate(records) if i not in held],
                         "val": [m for i, (_, _, m) in enumerate(records) if i in held]}

    @property
    def longest(self) -> int:
        """Tokens of the longest conversation."""
        return max(len(ids) for split in self.splits.values() for ids, _ in split)

    def learned_tokens(self, split: str) -> int:
        return sum(int((labels != IGNORE_INDEX).sum()) for _, labels in self.splits[split])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of the learned tokens' text per learned token, for bits per byte of the assistant
        text; end-of-turn tokens add tokens but no bytes (as end-of-text does in `prepare`)."""
        stops = list(self.tokenizer.stop_ids)
        n_bytes = sum(len(self.tokenizer.decode(labels[(labels != IGNORE_INDEX) & ~np.isin(labels, stops)].tolist())
                          .encode("utf-8")) for _, labels in self.splits[split])
        return n_bytes / self.learned_tokens(split)

    def train_batches(self, batch_size: int, block_size: int, seed: int) -> ConversationBatches:
        return ConversationBatches(self.splits["train"], batch_size, block_size, seed, self.tokenizer.eot_id)

    def eval_batches(self, split: str, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Every conversation of `split` once, shortest first (tight rows): (x, y, n_valid) as `eval_batches`."""
        rows = sorted(self.splits[split], key=lambda r: len(r[0]))
        for b0 in range(0, len(rows), batch_size):
            x, y = pad_rows(rows[b0 : b0 + batch_size], block_size, self.tokenizer.eot_id)
            yield x, y, int((y != IGNORE_INDEX).sum())


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) per conversation -> x, y int64 [len(rows), block_size], right-padded (module doc)."""
    x = torch.full((len(rows), block_size), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), block_size), IGNORE_INDEX, dtype=torch.int64)
    for r, (ids, labels) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = torch.from_numpy(ids[:-1])
        y[r, :n] = torch.from_numpy(labels[1:])
    return x, y


class ConversationBatches:
    """Endless training batches of `batch_size` conversations (module doc); state: the batch count."""

    def __init__(self, rows: list[tuple[np.ndarray, np.ndarray]], batch_size: int, block_size: int, seed: int,
                 pad_id: int) -> None:
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        self.rows, self.batch_size, self.block_size, self.seed, self.pad_id = rows, batch_size, block_size, seed, pad_id
        self.batches = 0

    def __iter__(self) -> ConversationBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, B = len(self.rows), self.batch_size
        window, slot = divmod(self.batches, GROUP)
        stream = range(window * GROUP * B, (window + 1) * GROUP * B)  # the window's positions in the endless stream
        orders = {e: np.random.default_rng([self.seed, 1, e]).permutation(n) for e in {p // n for p in stream}}
        members = sorted((orders[p // n][p % n] for p in stream), key=lambda i: len(self.rows[i][0]))  # stable
        chunk = int(np.random.default_rng([self.seed, 2, window]).permutation(GROUP)[slot])
        self.batches += 1
        return pad_rows([self.rows[i] for i in members[chunk * B : (chunk + 1) * B]], self.block_size, self.pad_id)

    def state_dict(self) -> dict:
        return {"kind": "conversations", "batches": self.batches, "seed": self.seed, "count": len(self.rows)}

    def load_state_dict(self, d: dict) -> None:
        if d.get("kind") != "conversations" or d.get("seed") != self.seed or d.get("count") != len(self.rows):
            raise ValueError(f"data state {d} does not match this loader (conversations, seed={self.seed}, "
                             f"{len(self.rows)} training conversations): was the data file changed?")
        self.batches = int(d["batches"])
