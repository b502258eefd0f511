"""GPU check of the serving engine's decode step: a ragged cache (rows at their own lengths, joined
with `KVCache.set_rows`) decoded by the compiled CUDA-graph step (the fused MLA kernel reading each
row's length) against each row's fp32 full forward alone.

    PYTHONPATH=src python benchmarks/ragged_decode.py

Prints the relative error (max |diff| / max |reference|) of the bf16 step's logits; bf16 rounding
gives about 1e-2 (benchmarks/RESULTS.md, "Serve"), a wrong position or a leak between rows ~1.
"""

from __future__ import annotations

import torch

from latentformer import ModelConfig, Transformer
from latentformer.infer.cuda_graph import GraphDecodeStep

LENGTHS, STEPS, CONTEXT = [300, 17, 150, 64, 1, 255, 90, 200], 6, 512


def main() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("mla-125m").replace(max_seq_len=CONTEXT)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    ref = Transformer(cfg).cuda().eval()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # the bf16 weights, in fp32
    seqs = [torch.randint(0, cfg.vocab_size, (n + STEPS,), device="cuda") for n in LENGTHS]
    with torch.inference_mode():
        cache = model.make_cache(len(LENGTHS), CONTEXT)
        cache.ragged = True
        for b, n in enumerate(LENGTHS):
            prefill = model.make_cache(1, n)
            model(seqs[b][None, :n], cache=prefill)
            cache.set_rows(torch.tensor([b], device="cuda"), prefill, [n])
        step = GraphDecodeStep(model, cache, compile=True)
        got = []
        for t in range(STEPS):
            cache.pos = max(LENGTHS) + t  # the longest row: what the engine keeps
            got.append(step(torch.stack([s[n + t] for s, n in zip(seqs, LENGTHS)])[:, None])[:, 0].float().clone())
        got = torch.stack(got, 1)
        want = torch.stack([ref(s[None])[0, -STEPS:] for s in seqs])
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{torch.cuda.get_device_name()}: ragged decode (compiled CUDA graph, rows of {min(LENGTHS)}-{max(LENGTHS)} "
          f"tokens) vs fp32 full forward per row: rel err {err:.2e}")


if __name__ == "__main__":
    main()
