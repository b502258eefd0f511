"""Preallocated KV caches for incremental decoding.

MHA/GQA/MQA layers cache K and V: 2 x [B, n_kv_heads, S, head_dim].
MLA layers cache one tensor [B, S, kv_lora_rank + qk_rope_head_dim]: the normalized latent
c_kv followed by the rotated shared rope key k_pe, and nothing else (DeepSeek-V2 §2.1.3).
"""

from __future__ import annotations

import torch


class KVCache:
    """All layers' buffers plus the fill position.

    `pos` counts the slots written (the same for every row). Prompts of different lengths are
    left-padded: `pad[b]` slots at the start of row b hold padding that is never attended to,
    and row b's token in slot s has position s - pad[b].

    `length` is `pos` as a device scalar, kept equal to it: the decode layer's CUDA-graph step
    (latentformer.infer.decode) addresses the cache with it, so one captured step serves every position.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], batch_size: int, max_seq_len: int) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.pos = 0
        self.pad: torch.Tensor | None = None
        self.length = torch.zeros((), dtype=torch.long, device=layers[0][0].device)

    def advance(self, n: int) -> None:
        """Count `n` newly written slots (after a forward wrote them)."""
        self.pos += n
        self.length += n

    def set_left_padding(self, pad: torch.Tensor | list[int]) -> None:
        """Declare per-row left padding [B] before the first (prefill) forward."""
        if self.pos != 0:
            raise ValueError("left padding must be set on an empty cache")
        pad = torch.as_tensor(pad, dtype=torch.long, device=self.layers[0][0].device)
        if pad.shape != (self.batch_size,):
            raise ValueError(f"pad must have shape [{self.batch_size}], got {list(pad.shape)}")
        self.pad = pad if bool(pad.any()) else None

    def reset(self) -> None:
        self.pos = 0
        self.pad = None
        self.length.zero_()

    # Row-level editing for continuous batching (latentformer.infer.engine): rows join and leave
    # a running batch that shares one write position. `pad` is then a tensor kept for the cache's
    # lifetime and edited in place (a captured decode graph reads it). Every buffer is
    # [B, ..., S, C] (MLA [B, S, r+dr], K/V [B, Hk, S, D]): slots are dimension -2.

    def use_row_padding(self) -> torch.Tensor:
        """Give the cache a permanent padding tensor [B] (zeros; edited in place from now on)."""
        self.pad = torch.zeros(self.batch_size, dtype=torch.long, device=self.length.device)
        return self.pad

    def insert(self, row: int, src: "KVCache", src_row: int, n: int) -> None:
        """Copy the last `n` written slots of `src`'s row `src_row` (e.g. one prompt of a prefill)
        into `row` so that its last token sits at slot pos - 1; its earlier slots become padding."""
        if self.pad is None or not 0 < n <= min(self.pos, src.pos):
            raise ValueError(f"cannot insert {n} slots at position {self.pos} (row padding tensor: {self.pad is not None})")
        for mine, theirs in zip(self.layers, src.layers):
            for dst, s in zip(mine, theirs):
                dst[row].narrow(-2, self.pos - n, n).copy_(s[src_row].narrow(-2, src.pos - n, n))
        self.pad[row] = self.pos - n

    def shift(self, new_pos: int, span: int) -> None:
        """Move the last `span` written slots of every row, [pos - span, pos), to end at `new_pos`
        (one copy of that part of the cache); positions are unchanged because `pad` moves with them."""
        if self.pad is None or not 0 <= span <= min(self.pos, new_pos) or new_pos > self.max_seq_len:
            raise ValueError(f"cannot shift {span} slots from position {self.pos} to {new_pos}")
        if span and new_pos != self.pos:
            for layer in self.layers:
                for buf in layer:
                    moved = buf.narrow(-2, self.pos - span, span).clone()
                    buf.narrow(-2, new_pos - span, span).copy_(moved)
        self.pad += new_pos - self.pos
        self.pos = new_pos
        self.length.fill_(new_pos)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the cache buffers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)
