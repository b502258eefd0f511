"""Per-cell measurements: quality, training speed, decode speed, KV-cache memory.

- Quality: validation loss (nats/token), perplexity and bits per byte of the final weights over
  the whole validation split (`Trainer.evaluate`, the trainer's own batch, context and dtype).
- Training speed: the trainer's logged tokens/s per window (step time only; the first record,
  which holds warm-up and compilation, is left out), kept whole so the report can give their median
  and spread, and its MFU (GPU: flops_per_token x tokens/s / the GPU's dense bf16 peak;
  `Transformer.flops_per_token`, `train.logging.PEAK_FLOPS`).
- Decode speed: one-token steps at each (batch, context) over a cache filled with random values
  up to the context (a step's cost does not depend on what the cache holds, as in
  benchmarks/decode_throughput.py), tokens/s = batch / step time. CUDA: the step captured in a CUDA
  graph (`GraphDecodeStep`, uncompiled), bf16, median of 20 replays; CPU: eager, fp32, median of a
  burst of steps. Measured after every variant trained, in `DECODE_ROUNDS` rounds that each time
  every variant once at a point (`decode_samples`): a machine that slows down for a while slows
  every variant's samples alike, and the report gives the median over rounds and flags a spread
  too wide to read. MLA is measured both ways (the decode layer's `mla_decode`: absorbed and
  naive). The model is each variant's architecture with seeded random weights, not a trained cell:
  a dense step's time depends on the shapes, not on the values, so a variant is timed once and
  cells trained on another machine (carried without their checkpoints) are timed all the same.
  (A MoE variant's random router spreads tokens about evenly, which a trained, balanced one also
  aims at.) Contexts may exceed the training context: `max_seq_len` is raised (RoPE has no table).
- Memory: KV-cache bytes per token in bf16 (`Transformer.kv_cache_bytes_per_token`) and the
  largest batch whose cache alone fits in `memory_gib` GiB at a context (weights and activations
  not counted): floor(memory / (bytes per token x context)).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from latentformer.config import ModelConfig
from latentformer.infer.decode import Decoder
from latentformer.model.transformer import Transformer

KV_DTYPE = torch.bfloat16
DECODE_ROUNDS = 5  # samples of each decode point, one per round over all variants
MAX_BATCH_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def kv_bytes_per_token(model: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(model).kv_cache_bytes_per_token(KV_DTYPE)


def max_batch(bytes_per_token: int, context: int, memory_gib: float) -> int:
    return int(memory_gib * 2**30 // (bytes_per_token * context))


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        return Transformer(model).flops_per_token(seq_len)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_speed(records: list[dict[str, Any]]) -> dict[str, float | None]:
    steps = [r for r in records if not r.get("eval")]
    timed = steps[1:] or steps  # the first window holds warm-up / compilation
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    windows = [r["tokens_per_s"] for r in timed]
    return {"tokens_per_s": statistics.median(windows) if windows else None,
            "mfu": statistics.median(mfu) if mfu else None, "window_tokens_per_s": windows}


def val_curve(records: list[dict[str, Any]], batch_tokens: int) -> list[dict[str, float]]:
    """Periodic validation points: training tokens seen, loss, bits per byte."""
    return [{"tokens": r["step"] * batch_tokens, "loss": r["loss"], "bpb": r["bpb"]} for r in records
            if r.get("eval") and r.get("loss") is not None]  # a non-finite loss is logged as null


def _decode_model(cfg: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    """`cfg`'s architecture with seeded random weights (see the module docstring), context >= max_len."""
    torch.manual_seed(0)
    return Transformer(cfg.replace(max_seq_len=max(cfg.max_seq_len, max_len), mtp_depth=0)).to(device, dtype).eval()


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _step_bytes(model: Transformer, batch: int, context: int, dtype: torch.dtype, mode: str) -> int:
    """Cache plus the naive path's per-layer keys/values expanded from the latent (its transient)."""
    cfg = model.config
    need = model.kv_cache_bytes_per_token(dtype) * batch * (context + 1)
    if mode == "naive":
        need += batch * (context + 1) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_dim) * dtype.itemsize * 2
    return need


@torch.no_grad()
def _time_step(model: Transformer, batch: int, context: int, device: torch.device, min_seconds: float,
               mla_decode: str) -> float:
    """Seconds of one decode step at `context` cached tokens: the median of CUDA-event timings of
    graph replays, or on a CPU of a burst of eager steps (at least 3, for at least `min_seconds`)."""
    cache = model.make_cache(batch, context + 1)
    for layer in cache.layers:
        for t in layer:
            t.normal_()
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def reset() -> None:
        cache.pos = context
        cache.length.fill_(context)

    reset()
    times: list[float] = []
    if device.type == "cuda":
        from latentformer.infer.cuda_graph import GraphDecodeStep

        step = GraphDecodeStep(model, cache, mla_decode=mla_decode)
        step.tokens.copy_(tokens)
        for i in range(25):
            reset()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step.graph.replay()
            b.record()
            torch.cuda.synchronize(device)
            if i >= 5:
                times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)
    decoder = Decoder(model, cache, mla_decode)
    decoder(tokens)  # warm-up
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < 100):
        reset()
        t0 = time.perf_counter()
        decoder(tokens)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sample(model: Transformer, batch: int, context: int, mode: str, device: torch.device, min_seconds: float) -> float | None:
    """Decode tokens/s of one timing, None where the cache (plus, for naive MLA, its expanded
    keys/values) would not fit in half the free memory."""
    dtype = next(model.parameters()).dtype
    if _step_bytes(model, batch, context, dtype, mode) >= 0.5 * _free_bytes(device):
        return None
    try:  # "standard": no MLA layer to choose for
        seconds = _time_step(model, batch, context, device, min_seconds, "naive" if mode == "naive" else "absorb")
    except torch.OutOfMemoryError:
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return batch / seconds


def decode_samples(configs: dict[str, ModelConfig], contexts: list[int], batch_sizes: list[int], device: torch.device,
                   rounds: int = DECODE_ROUNDS, min_seconds: float = 0.02) -> list[dict[str, Any]]:
    """Rows {variant, mode, batch_size, context, tokens_per_s}: one tokens/s sample per round, or
    None where the point does not fit (`_sample`). `configs`: variant name -> its model config.

    Interleaved: at each point, round r times every (variant, mode) once, in an order rotated by r,
    so slow spells of a shared machine fall on every variant rather than on one."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {name: _decode_model(cfg, max(contexts) + 1, device, dtype) for name, cfg in configs.items()}
    entries = [(name, mode) for name, cfg in configs.items() for mode in (["absorb", "naive"] if cfg.attention == "mla" else ["standard"])]
    rows = []
    for batch in batch_sizes:
        for context in contexts:
            samples: dict[tuple[str, str], list[float] | None] = {e: [] for e in entries}
            for r in range(rounds):
                for e in entries[r % len(entries):] + entries[:r % len(entries)]:
                    if samples[e] is not None:  # None: did not fit, not tried again
                        tps = _sample(models[e[0]], batch, context, e[1], device, min_seconds)
                        samples[e] = None if tps is None else samples[e] + [tps]
            rows += [{"variant": name, "mode": mode, "batch_size": batch, "context": context, "tokens_per_s": samples[(name, mode)]}
                     for name, mode in entries]
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure_cell(trainer, run_dir: Path) -> dict[str, Any]:
    """Quality and training speed of one trained cell (its `trainer` holds the final weights); decode
    speed is measured over all variants at once (`decode_samples`)."""
    val = trainer.evaluate(max_tokens=0)
    records = read_metrics(run_dir)
    cfg = trainer.cfg
    return {
        "val": {"loss": val["loss"], "perplexity": val["perplexity"], "bpb": val["bpb"], "tokens": val["tokens"]},
        "train": {**training_speed(records), "steps": trainer.step, "tokens": trainer.step * cfg.train.batch_tokens,
                  "seconds": trainer.train_seconds, "skipped_steps": trainer.skipped_steps,
                  "dtype": trainer.dtype, "compile": cfg.train.compile},
        "curve": val_curve(records, cfg.train.batch_tokens),
        "device": device_name(trainer.env.device),
        "params": trainer.model.num_params(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
