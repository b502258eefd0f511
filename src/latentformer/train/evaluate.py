"""Validation over a whole split: loss (nats/token), perplexity and bits per byte.

bits per byte = (loss_nats x n_tokens) / (ln 2 x n_bytes), with the split's UTF-8 byte count from
the prepared data's meta (via `TokenData.bytes_per_token`), so models with different tokenizers
compare on one scale. Batches come from the data layer's `eval_batches`, which covers every
target of the split exactly once (padding targets are -100 and ignored); for conversations
(`ChatData`) the targets are the assistant tokens and the bytes their text's.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from latentformer.model.transformer import IGNORE_INDEX
from latentformer.train.distributed import all_reduce_sum


def evaluate(model, tokens, *, batch_size: int, seq_len: int, bytes_per_token: float,
             device: torch.device | str = "cpu", autocast=contextlib.nullcontext, max_tokens: int = 0,
             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Mean cross-entropy over the targets of a 1-D token split (or the first `max_tokens` of them when > 0).

    With world_size > 1, batch i is evaluated by rank i % world_size and the sums are all-reduced
    (pass rank=0, world_size=1 to evaluate everything on every rank, e.g. under FSDP where every
    rank must run the same forwards).
    """
    from latentformer.data.dataset import eval_batches

    return evaluate_batches(model, eval_batches(tokens, batch_size, seq_len), bytes_per_token=bytes_per_token,
                            device=device, autocast=autocast, max_tokens=max_tokens, rank=rank, world_size=world_size)


@torch.no_grad()
def evaluate_batches(model, batches, *, bytes_per_token: float, device: torch.device | str = "cpu",
                     autocast=contextlib.nullcontext, max_tokens: int = 0, rank: int = 0,
                     world_size: int = 1) -> dict[str, float]:
    """`evaluate` over batches (x, y, n_valid) of any data source: windows of tokens, or padded
    conversations whose unlearned targets are -100 (the padding columns are cut first)."""
    from latentformer.data.dataset import trim_padding

    was_training = model.training
    model.eval()
    device = torch.device(device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss_sum, n_targets]
    seen = 0
    try:
        for i, (x, y, n_valid) in enumerate(batches):
            if max_tokens and seen >= max_tokens:
                break
            seen += int(n_valid)
            if i % world_size != rank:
                continue
            x, y = trim_padding(x, y)
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            totals[0] += loss_sum.double()
            totals[1] += (y != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if world_size > 1:
        all_reduce_sum(totals)
    loss_sum, n = totals.tolist()
    if n == 0:
        raise ValueError("evaluation split holds no targets (is it shorter than 2 tokens?)")
    loss = loss_sum / n
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bpb": loss / (math.log(2) * bytes_per_token),
        "tokens": int(n),
    }
