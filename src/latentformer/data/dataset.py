"""Token datasets over a prepared directory: random training windows, exact evaluation batches.

Shapes: B = batch_size, T = block_size. Every loader yields CPU int64 tensors `x, y` of shape
[B, T] with y[b, t] = tokens[start_b + t + 1] -- targets are the next tokens *from the data*;
a window never wraps around the end of the split.

Bits per byte: with L the mean cross-entropy in nats per token over a whole split,
    bpb = L / ln(2) * tokens / bytes = L / ln(2) / bytes_per_token(split)
where `bytes` counts the UTF-8 bytes of the documents' text (end-of-text tokens add tokens but no
bytes, so they are charged to the text they terminate). This makes models with different
tokenizers comparable.

The training loader is an iterator whose whole state is a count (`state_dict() == {"batches": k, ...}`):
the k-th batch is a pure function of (seed, k), so a resumed loader yields exactly the batches
the uninterrupted one would have.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from latentformer.data.prepare import SPLITS
from latentformer.model.transformer import IGNORE_INDEX

# `trim_padding` cuts rows to a multiple of this many columns (fewer distinct shapes for torch.compile)
PAD_MULTIPLE = 8


class TokenData:
    """A directory written by `prepare`: `meta`, `tokens(split)` memmaps, lazy `tokenizer`."""

    def __init__(self, data_dir) -> None:
        self.data_dir = Path(data_dir)
        meta_path = self.data_dir / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.data_dir} has no meta.json: not a prepared data directory (run `latentformer prepare`)")
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
        self.dtype = _check_meta(self.meta, meta_path)
        self._tokens: dict[str, np.ndarray] = {}

    @cached_property
    def tokenizer(self):
        from latentformer.data.tokenizer import load_tokenizer

        return load_tokenizer(self.data_dir)

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only 1-D memmap (dtype uint16 or uint32)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._tokens:
            path = self.data_dir / f"{split}.bin"
            n = self.meta["splits"][split]["tokens"]
            if not path.is_file() or path.stat().st_size != n * self.dtype.itemsize:
                raise ValueError(f"{path} is missing or truncated (expected {n} {self.dtype.name} tokens); re-run prepare --force")
            self._tokens[split] = np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
        return self._tokens[split]

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 text bytes per token of `split`; bpb = loss_nats_per_token / ln(2) / bytes_per_token."""
        s = self.meta["splits"][split]
        return s["bytes"] / s["tokens"]

    def train_batches(self, batch_size: int, block_size: int, seed: int) -> RandomWindows:
        """The trainer's batches: random windows of the training split."""
        return RandomWindows(self.tokens("train"), batch_size, block_size, seed)

    def eval_batches(self, split: str, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Every target of `split` once (module function `eval_batches`)."""
        return eval_batches(self.tokens(split), batch_size, block_size)


def _check_meta(meta, meta_path: Path) -> np.dtype:
    """The token dtype of a prepared directory's meta.json, after checking the fields the loaders read
    (a hand-edited or foreign meta.json is one ValueError naming the file and the field)."""
    redo = "re-run `latentformer prepare --force`"
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object; {redo}")
    dtype = meta.get("dtype")
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{meta_path}: field 'dtype' is {'missing' if dtype is None else repr(dtype)} "
                         f"(expected uint16 or uint32); {redo}")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_size"), int):
        raise ValueError(f"{meta_path}: field 'tokenizer' (with an integer 'vocab_size') is missing; {redo}")
    splits = meta.get("splits")
    for split in SPLITS:
        counts = splits.get(split) if isinstance(splits, dict) else None
        if not (isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in ("tokens", "bytes"))
                and counts["tokens"] > 0 and counts["bytes"] >= 0):
            raise ValueError(f"{meta_path}: field 'splits.{split}' (token and byte counts) is missing or malformed; {redo}")
    return np.dtype(dtype)


def _window(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[b] = tokens[s_b : s_b+T], y[b] = tokens[s_b+1 : s_b+T+1] as int64 [B, T] tensors."""
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]  # [B, T+1]
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _check(tokens: np.ndarray, batch_size: int, block_size: int) -> None:
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    if len(tokens) < block_size + 1:
        raise ValueError(f"split has {len(tokens)} tokens, too few for one window of block_size {block_size} (+1 target)")


class RandomWindows:
    """nanoGPT-style sampling: each batch holds B windows with uniformly random starts. Infinite.

    Batch k is drawn from `np.random.default_rng([seed, 0, k])`, so the state is just k. Under
    data parallelism every rank draws the same global batch and keeps its own rows (see the
    trainer), which makes a run the same computation at any world size.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int) -> None:
        _check(tokens, batch_size, block_size)
        self.tokens, self.batch_size, self.block_size, self.seed = tokens, batch_size, block_size, seed
        self.batches = 0
        self._n_starts = len(tokens) - block_size  # starts 0 .. N-T-1 keep the last target in range

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the 0 keeps the stream of checkpoints written when loaders took a rank (always 0)
        rng = np.random.default_rng([self.seed, 0, self.batches])
        starts = rng.integers(0, self._n_starts, size=self.batch_size)
        self.batches += 1
        return _window(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict:
        return {"kind": "random", "batches": self.batches, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        # older checkpoints also hold rank 0 / world_size 1: the same stream
        if (d.get("kind") != "random" or d.get("seed") != self.seed
                or d.get("rank", 0) != 0 or d.get("world_size", 1) != 1):
            raise ValueError(f"data state {d} does not match this loader (random, seed={self.seed})")
        self.batches = int(d["batches"])


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Non-overlapping windows covering the WHOLE split: every target position 1..N-1 exactly once.

    Yields (x, y, n_valid): x, y int64 [b, T] (b <= batch_size on the last batch); the last
    window is right-padded (x with 0, y with -100, the ignore index of cross_entropy); n_valid
    is the number of real targets in the batch. Sum the per-token losses and divide by the
    sum of n_valid for the exact mean over the split.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise ValueError(f"split has {len(tokens)} tokens: nothing to evaluate")
    starts = np.arange(0, n_targets, block_size)
    for b0 in range(0, len(starts), batch_size):
        rows = starts[b0 : b0 + batch_size]
        x = torch.zeros(len(rows), block_size, dtype=torch.int64)
        y = torch.full((len(rows), block_size), IGNORE_INDEX, dtype=torch.int64)
        n_valid = 0
        for r, s in enumerate(rows):
            n = min(block_size, n_targets - int(s))
            seg = torch.from_numpy(np.asarray(tokens[s : s + n + 1], dtype=np.int64))
            x[r, :n] = seg[:-1]
            y[r, :n] = seg[1:]
            n_valid += n
        yield x, y, n_valid


def trim_padding(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [B, T] without the columns after the last counted target (-100 = not counted), rounded up
    to PAD_MULTIPLE columns: under causal attention no earlier position reads them. Padded rows of
    conversations lose their common padding; windows of prepared tokens come back whole."""
    counted = (y != IGNORE_INDEX).any(0).nonzero()
    width = int(counted[-1]) + 1 if len(counted) else 1
    width = min(y.shape[1], -(-width // PAD_MULTIPLE) * PAD_MULTIPLE)
    return x[:, :width], y[:, :width]
