"""GPU training throughput through `latentformer train`'s own step, side by side with
transformers' DeepseekV3ForCausalLM at the same shape (same batch, AdamW, bf16 autocast).

Run on a CUDA machine:  PYTHONPATH=src python benchmarks/train_throughput.py --data DIR
DIR is a prepared GPT-2 data set (`latentformer prepare --source sotu --tokenizer gpt2`).
Tokens/s is the median over timed optimizer steps after warm-up (compilation excluded);
MFU = flops_per_token(seq_len) x tokens/s / dense bf16 peak (H100 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from unittest import mock

import torch

from kernel_table import kernel_table
from latentformer import Transformer
from latentformer.checkpoint import save_checkpoint
from latentformer.data.tokenizer import load_tokenizer
from latentformer.model import loss as fused_loss
from latentformer.train import fp8, optim
from latentformer.train.config import build_run_config
from latentformer.train.trainer import Trainer


VARIANTS = {  # name -> config overrides
    "shipped": {}, "fp32-residual": {"train.low_precision_residual": False}, "seed2": {"train.seed": 1338},
    # torchao float8 in the FFNs, the output layer's three matmuls in the fused loss (the default)
    "fp8": {"train.fp8": True}, "fp8-rowwise": {"train.fp8": True, "train.fp8_recipe": "rowwise"},
    "fp8-ffn": {"train.fp8": True, "train.fp8_output": False},  # the output layer in bf16
    "fp8-grads": {"train.fp8": True},  # fp8 with the output layer's logits from bf16 (`alternative`)
    "fp8-all": {"train.fp8": True, "train.fp8_layers": "all"},  # attention's projections too
    "distill": {},  # train.teacher: a model of the preset's own architecture and size (random weights), written per run
    "fp8-fastacc": {"train.fp8": True, "train.fp8_layers": "all"},  # fp8-all, fast accumulation (`alternative`)
    "muon": {"train.optimizer": "muon"},  # one Newton-Schulz per shape of matrix (BatchedMuon)
    "muon-torch": {"train.optimizer": "muon"},  # torch.optim.Muon's step, one matrix at a time (`alternative`)
}


@contextlib.contextmanager
def alternative(name: str):
    """While a run of `fp8-fastacc` builds and trains: all three float8 matmuls with fast (FP8)
    accumulation, where torchao's tensorwise recipe keeps it for the forward only; for `muon-torch`:
    torch's own Muon in place of BatchedMuon; for `fp8-grads`: the FP8 output layer's logits from a
    bf16 matmul."""
    if name in ("muon-torch", "fp8-grads"):
        with (mock.patch.object(optim, "BatchedMuon", torch.optim.Muon) if name == "muon-torch"
              else mock.patch.object(fused_loss, "FP8_LOGITS", False)):
            yield
        return
    if name != "fp8-fastacc":
        yield
        return
    from torchao.float8.config import Float8GemmConfig

    def fast(recipe, emulate=False, _base=fp8.float8_config):
        fast = Float8GemmConfig(use_fast_accum=True)
        return dataclasses.replace(_base(recipe, emulate), gemm_config_output=fast, gemm_config_grad_input=fast,
                                   gemm_config_grad_weight=fast)
    with mock.patch.object(fp8, "float8_config", fast):
        yield


def same_size_teacher(cfg, explicit: bool, data: str, directory: str) -> str:
    """A checkpoint in `directory` of the run's own architecture (random weights) and the data's
    tokenizer, with the vocabulary the trainer will give the run (the tokenizer's unless explicit)."""
    tokenizer = load_tokenizer(data)
    model = cfg.model if explicit else cfg.model.replace(vocab_size=tokenizer.vocab_size)
    return str(save_checkpoint(directory, Transformer(model), tokenizer))


def ours(preset: str, data: str, seq_len: int, micro: int, accum: int, compile: bool, steps: int,
         profile: bool = False, name: str = "shipped", echo_every: int = 0) -> dict:
    overrides = {"data.dir": data, "train.seq_len": seq_len, "train.micro_batch_size": micro,
                 "train.batch_tokens": seq_len * micro * accum, "train.compile": compile, "train.progress": False,
                 "train.tensorboard": False, "train.warmup_steps": 10, "model.max_seq_len": max(seq_len, 1024),
                 "train.max_steps": 10**6, "train.lr": 6e-4, "train.min_lr": 6e-4, **VARIANTS[name]}
    cfg, explicit = build_run_config(preset=preset, overrides=overrides)
    torch._dynamo.reset()  # each run is a new model: stay under dynamo's recompile limit
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.reset_accumulated_memory_stats()
    with tempfile.TemporaryDirectory() as run, tempfile.TemporaryDirectory() as teacher:
        if name == "distill":  # the teacher's forward and the fused KL are what this variant costs
            cfg.train.teacher = same_size_teacher(cfg, explicit, data, teacher)
        with alternative(name):
            tr = Trainer(cfg, run, vocab_explicit=explicit)
            print(f"{preset} ({name}):", "; ".join(tr.notes) or "no notes", flush=True)
            times, losses = [], []
            for i in range(steps + 5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                losses.append(tr.train_step()[0])  # ends in a host sync (the loss)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
                if echo_every and (i + 1) % echo_every == 0:  # a run cut short still shows its curve
                    tps = seq_len * micro * accum / statistics.median(times or [1])
                    print(f"  step {i + 1}: loss {losses[-1]:.4f}, {tps:,.0f} tok/s", flush=True)
            if profile:
                kernel_table(lambda: [tr.train_step() for _ in range(2)],
                             f"{preset} T{seq_len} ({name}): two optimizer steps", gaps=12)
        tps = seq_len * micro * accum / statistics.median(times)
        mfu = tr.flops_per_token * tps / tr.peak if tr.peak else float("nan")
        # the last step's loss and the mean of the last 20 (every variant sees the same batches in the same order)
        out = {"tokens/s": tps, "mfu": mfu, "loss": losses[-1], "loss20": statistics.fmean(losses[-20:]), "losses": losses, "mem_gb": torch.cuda.max_memory_allocated() / 1e9,
               "reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
               # > 0: the caching allocator ran out, freed its cache and retried (slow; a fragmentation sign)
               "alloc_retries": torch.cuda.memory_stats()["num_alloc_retries"],
               "params": tr.model.num_params(), "flops_per_token": tr.flops_per_token, "peak": tr.peak}
        del tr
    torch.cuda.empty_cache()
    return out


def transformers_v3(preset: str, seq_len: int, micro: int, accum: int, compile: bool, steps: int) -> dict:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from latentformer import ModelConfig
    from latentformer.interop.hf_config import to_hf_config

    hf = to_hf_config(ModelConfig.preset(preset).replace(max_seq_len=max(seq_len, 1024)), dtype="float32")
    hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
    config = DeepseekV3Config(**hf)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, 50257, (micro, seq_len + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(input_ids=x[:, :-1], labels=x[:, 1:]).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    out = {"tokens/s": seq_len * micro * accum / statistics.median(times), "mem_gb": torch.cuda.max_memory_allocated() / 1e9}
    del model, opt, fwd
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--presets", default="mla-125m,mha-125m,latentformer-348m,moe-mla-small,mla-125m@4096",
                    help="comma-separated presets; preset@T[xB[xA]] sets seq_len, micro batch, accumulation")
    ap.add_argument("--variants", default="shipped", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--curve", type=int, default=0, help="also print the loss every 20 steps of a run this long, per variant")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step (both libraries)")
    ap.add_argument("--profile", action="store_true", help="print a kernel table of one step per preset")
    ap.add_argument("--modes", default="compiled", help="comma-separated: compiled, eager")
    ap.add_argument("--hf", default="eager,compiled", help="transformers DeepseekV3 modes to time ('' = none)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"accum {args.accum} unless a preset gives its own")
    micro = {"latentformer-348m": 16}
    runs = []  # (preset, seq_len, micro batch, accumulation)
    for item in args.presets.split(","):
        preset, _, shape = item.partition("@")
        T, B, A = (shape.split("x") + ["", "", ""])[:3]
        T = int(T or 1024)
        runs.append((preset, T, int(B or micro.get(preset, 32) * 1024 // T), int(A or args.accum)))
    rows, curves = [], {}
    for preset, T, B, A in runs:
        for name in args.variants.split(","):
            for comp in [m == "compiled" for m in args.modes.split(",")]:
                r = ours(preset, args.data, T, B, A, comp, args.curve or args.steps, args.profile, name, 20 * bool(args.curve))
                curves[f"{preset} {name}"] = r["losses"]
                mode = ("compiled" if comp else "eager") + ("" if name == "shipped" else f", {name}")
                rows.append((f"latentformer {preset}", T, f"{B}x{A}", mode, r["tokens/s"], r["mfu"], r["mem_gb"]))
                print(rows[-1], f"loss {r['loss']:.4f} (last 20 steps {r['loss20']:.4f}), reserved {r['reserved_gb']:.1f} GB, "
                      f"allocator retries {r['alloc_retries']}", flush=True)
                if args.curve:  # as the table at the end prints them: kept if a later variant fails
                    print("  loss every 20 steps:", " ".join(f"{v:.4f}" for v in r["losses"][19::20]), flush=True)
    for mode in filter(None, args.hf.split(",")):
        try:
            r = transformers_v3("mla-125m", 1024, 32, args.accum, mode == "compiled", args.steps)
            rows.append(("transformers DeepseekV3 @mla-125m", 1024, f"32x{args.accum}", mode, r["tokens/s"], float("nan"), r["mem_gb"]))
            print(rows[-1], flush=True)
        except Exception as e:  # report, keep the table
            print(f"transformers DeepseekV3 ({mode}) failed: {type(e).__name__}: {str(e)[:200]}")
    if args.curve:
        print("\ntraining loss (lr 6e-4 constant after 10 warm-up steps; BxA in the table below; the same batches in every variant)")
        print(f"{'step':>5} " + " ".join(f"{k[-24:]:>24}" for k in curves))
        for i in range(19, args.curve + 5, 20):
            print(f"{i + 1:>5} " + " ".join(f"{v[i]:24.4f}" for v in curves.values()))
    print(f"\n{'model':36} {'T':>5} {'BxA':>5} {'mode':24} {'tokens/s':>10} {'MFU':>6} {'peak GB':>8}")
    for name, T, B, mode, tps, mfu, mem in rows:
        print(f"{name:36} {T:>5} {B:>5} {mode:24} {tps:10.0f} {mfu * 100:5.1f}% {mem:8.1f}")
