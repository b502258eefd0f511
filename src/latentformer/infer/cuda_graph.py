"""One-token decode step captured in a CUDA graph and replayed.

At small batch a decode step is hundreds of tiny kernel launches; the CPU cannot issue them
as fast as the GPU runs them. Capturing the step once and replaying it removes that
overhead. The step is the decode layer's (`Decoder(static=True)`: device-side position counter,
whole-buffer attention masked to the valid length), so the same graph serves every position.
"""

from __future__ import annotations

import warnings

import torch

from latentformer.infer.decode import Decoder
from latentformer.model.cache import KVCache
from latentformer.model.transformer import Transformer


class GraphDecodeStep:
    """`step(tokens [B, 1]) -> logits [B, 1, vocab]` for `model` over `cache` (CUDA only).

    `compile=True` first fuses the step's elementwise work with torch.compile (fewer, larger
    kernels: inside a graph each kernel still costs a few microseconds), then captures that.
    `mla_decode` as for `Decoder`. The returned logits tensor is reused by the next call: copy it
    if you keep it."""

    def __init__(self, model: Transformer, cache: KVCache, warmup: int = 2, compile: bool = False,
                 mla_decode: str = "absorb") -> None:
        device = cache.length.device
        if device.type != "cuda":
            raise ValueError("CUDA-graph decoding needs a CUDA device")
        self.model, self.cache = model, cache
        self.decoder = decoder = Decoder(model, cache, mla_decode, static=True)
        fn = torch.compile(decoder.__call__, dynamic=False) if compile else decoder
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        pos, length = cache.pos, cache.length.clone()

        def restore() -> None:  # warm-up and capture write one garbage slot that the first real step overwrites
            cache.pos = pos
            cache.length.copy_(length)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            try:
                self._warm_up(fn, warmup, restore)
            except Exception as e:  # an inductor/Triton failure must not take decoding down with it
                if fn is decoder:
                    raise
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "capturing the uncompiled step instead", RuntimeWarning, stacklevel=2)
                restore()
                fn = decoder
                self._warm_up(fn, warmup, restore)
        torch.cuda.current_stream(device).wait_stream(side)
        self.compiled = fn is not decoder  # False after a fallback
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = fn(self.tokens)
        restore()

    def _warm_up(self, fn, n: int, restore) -> None:
        for _ in range(n):  # compile kernels, init cuBLAS workspaces outside the capture
            fn(self.tokens)
            restore()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.pos + 1 > self.cache.max_seq_len:
            raise ValueError(f"the cache is full ({self.cache.max_seq_len} tokens)")
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.pos += 1
        return self.logits


def decode_step(model: Transformer, cache: KVCache, compile: bool) -> Decoder | GraphDecodeStep:
    """tokens [B, 1] -> logits [B, 1, V] through `cache`: the decode layer, eagerly, or (`compile`,
    CUDA) its compiled step captured as a CUDA graph, whose output buffer the next call reuses."""
    return GraphDecodeStep(model, cache, compile=True) if compile else Decoder(model, cache)
