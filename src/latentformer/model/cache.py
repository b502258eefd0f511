"""Preallocated KV caches for incremental decoding.

MHA/GQA/MQA layers cache K and V: 2 x [B, n_kv_heads, S, head_dim].
MLA layers cache one tensor [B, S, kv_lora_rank + qk_rope_head_dim]: the normalized latent
c_kv followed by the rotated shared rope key k_pe, and nothing else (DeepSeek-V2 §2.1.3).
"""

from __future__ import annotations

import torch

from latentformer.devices import to_device


class KVCache:
    """All layers' buffers plus how much of each row is written.

    Rows are addressed in one of two ways:
    - shared (the default; a batch decoded together from one prefill): every row has written
      `pos` slots. Prompts of different lengths are left-padded: `pad[b]` slots at the start of
      row b hold padding that is never attended to, and row b's token in slot s has position
      s - pad[b].
    - ragged (`ragged = True`; continuous batching): row b has written its own `length[b]` slots,
      its token in slot s has position s, and rows join (`set_rows`) and leave without moving any
      other row. `pos` is then the longest row's count, what attention reads up to; the owner of
      the rows keeps it so (see latentformer.infer.engine).

    `length` [B] is the per-row count on the device. The decode layer's CUDA-graph step
    (latentformer.infer.decode) addresses the cache with it, so one captured step serves every
    position; in shared mode every entry equals `pos`.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, ...]], batch_size: int, max_seq_len: int) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.pos = 0
        self.pad: torch.Tensor | None = None
        self.ragged = False
        self.length = torch.zeros(batch_size, dtype=torch.long, device=layers[0][0].device)

    def advance(self, n: int) -> None:
        """Count `n` newly written slots in every row (after a forward wrote them)."""
        self.pos += n
        self.length += n

    def set_left_padding(self, pad: torch.Tensor | list[int]) -> None:
        """Declare per-row left padding [B] before the first (prefill) forward."""
        if self.pos != 0 or self.ragged:
            raise ValueError("left padding must be set on an empty cache with shared addressing")
        pad = torch.as_tensor(pad, dtype=torch.long)  # a list stays on the host: no device sync to check it
        if pad.shape != (self.batch_size,):
            raise ValueError(f"pad must have shape [{self.batch_size}], got {list(pad.shape)}")
        self.pad = to_device(pad, self.layers[0][0].device) if bool(pad.any()) else None

    def reset(self) -> None:
        self.pos = 0
        self.pad = None
        self.ragged = False
        self.length.zero_()

    def set_rows(self, rows: torch.Tensor, src: KVCache, lengths: list[int]) -> None:
        """Ragged addressing: row rows[i] ([G] on the cache's device) takes the last lengths[i]
        written slots of `src`'s row i (the prompts of one left-padded prefill) at slots 0..n-1;
        its slots from n up to src.pos hold copies that no query reads before they are written.
        Other rows are untouched. Two kernels per buffer (a gather, an indexed copy), whatever G.
        Every buffer is [B, ..., S, C]: slots are dimension -2."""
        L = src.pos
        if not self.ragged or not (len(lengths) == rows.numel() == src.batch_size and 0 < L <= self.max_seq_len
                                   and all(0 < n <= L for n in lengths)):
            raise ValueError(f"cannot set rows of lengths {lengths} from a source at {L} (ragged cache: {self.ragged})")
        shift = torch.tensor([L - n for n in lengths])[:, None] + torch.arange(L)  # [G, L]: source slot per slot
        take = to_device(shift.clamp(max=L - 1), rows.device)
        g = torch.arange(len(lengths), device=rows.device)[:, None]
        for mine, theirs in zip(self.layers, src.layers):
            for dst, s in zip(mine, theirs):
                picked = s.movedim(-2, 1)[g, take]  # [G, L, ...]: row i's prompt at slots 0..n_i-1
                dst.narrow(-2, 0, L).movedim(-2, 1).index_copy_(0, rows, picked)
        self.length.index_copy_(0, rows, to_device(lengths, rows.device, torch.long))
        self.pos = max(self.pos, max(lengths))

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the cache buffers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)
