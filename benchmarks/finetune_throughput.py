"""Fine-tuning throughput: `latentformer finetune`'s training step, every weight and LoRA, side by side
with trl's SFTTrainer + peft (or `--reference trainer`: transformers' Trainer + peft) on the same model,
rows, sequence length and batch, in one process.

GPU (SmolLM2-135M's architecture: Llama, 30 layers, d_model 576, GQA 9/3 heads, vocabulary 49,152, tied):
    PYTHONPATH=src:wheels python benchmarks/finetune_throughput.py [--compile] [--seq-len 512] [--batch 16] [--lora-rank 16]
Where our step's GPU time goes (kernels, GPU idle between them), without the reference:
    PYTHONPATH=src python benchmarks/finetune_throughput.py --compile --runs lora --reference none --profile
CPU, a tiny model, to show it runs:
    PYTHONPATH=src python benchmarks/finetune_throughput.py --tiny

The reference needs trl, datasets, peft and accelerate (trl 1.16.0 0.9 MB, datasets 5.2.0 0.6 MB, dill
and multiprocess 0.3 MB; datasets 5.2 wants pyarrow >= 24, 55 MB). SFTTrainer gets the rows
pre-tokenized with their labels (it then neither templates nor re-tokenizes) and gradient
checkpointing off (its config's default is on; ours does not checkpoint); it also computes its
per-step token accuracy and entropy, as it does for its users.

Weights are random (seeded; throughput does not depend on their values) and the same on both sides:
the Hugging Face model is our export (interop.hf_config.to_hf_config / interop.hf.to_hf_state). The
data are conversations of byte tokens (the byte tokenizer: no tokenizer files needed) whose rendered
plain transcript is exactly seq_len tokens, so every row is full (seq_len - 1 inputs and one padding
position, on both sides) and most of its targets (the assistant's) count. Both sides draw the same rows (our trainer's own
batches), train in bf16 autocast on CUDA (fp32 on a CPU) with fused AdamW (lr 1e-4, constant),
gradient clipping at 1.0, no evaluation, no checkpoints. LoRA adapts every attention and FFN
projection at the same rank and alpha on both sides (ours adapts the fused qkv projection as one
matrix, peft q, k and v separately). Tokens/s = batch x seq_len / median step time after warm-up.
The table is printed last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from latentformer.checkpoint import read_config, save_checkpoint
from latentformer.config import ModelConfig
from latentformer.data.tokenizer import load_tokenizer
from latentformer.model.transformer import IGNORE_INDEX, Transformer
from latentformer.train import distributed
from latentformer.train.config import DataConfig, RunConfig, TrainConfig
from latentformer.train.trainer import Trainer

SMOLLM2 = dict(vocab_size=49152, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
               max_seq_len=8192, attention="gqa", tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5)
TINY = dict(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
            max_seq_len=512, attention="gqa", tie_embeddings=True)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_conversations(path: Path, seq_len: int, count: int) -> None:
    """`count` conversations whose plain transcript (+ end-of-text) is seq_len byte tokens."""
    words = "the state of the union address congress nation people economy law war peace year".split()
    lines = []
    for k in range(count):
        question = " ".join(words[(k + i) % len(words)] for i in range(4)) + "?"
        fixed = len(f"User: {question}\nAssistant: \n") + 1  # + end-of-text
        answer = (" ".join(words[(3 * k + i) % len(words)] for i in range(seq_len)))[: seq_len - fixed]
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")


def ours(ckpt: Path, data: Path, seq_len: int, batch: int, lora_rank: int, compile: bool, steps: int,
         warmup: int, device: str, profile: bool = False, compile_mode: str = "default") -> tuple[dict, list]:
    """Our trainer's step; returns (result, the rows it trained on). `profile` (CUDA): then prints the
    kernels of two more steps and the GPU's idle time between them (kernel_table.py). `compile_mode`: the
    trainer's whole-model compile in that torch.compile mode (an experiment: "reduce-overhead" replays
    CUDA graphs)."""
    train = TrainConfig(device=device, seq_len=seq_len, micro_batch_size=batch, batch_tokens=seq_len * batch,
                        max_steps=10**6, max_time_minutes=0, lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=0.0,
                        compile=compile, progress=False, tensorboard=False, lora_rank=lora_rank, lora_alpha=2.0 * max(lora_rank, 1))
    cfg = RunConfig(read_config(ckpt), DataConfig(chat_file=str(data), tokenizer=str(ckpt), chat_val_fraction=0.05), train)
    with tempfile.TemporaryDirectory() as run, \
            mock.patch.object(distributed, "compile_model", lambda model: model.compile(mode=compile_mode)):
        tr = Trainer(cfg, run, vocab_explicit=True, init_from=ckpt)
        it = tr.data.train_batches(batch, seq_len, train.seed)  # the batches our step draws, for the reference
        rows = [next(it) for _ in range(warmup + steps)]
        _reset_memory(device)
        times = []
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = tr.train_step()[0]  # ends in a host sync (the loss)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out = {"tokens/s": seq_len * batch / statistics.median(times), "loss": loss, "mem_gb": _peak_gb(device),
               "trainable": sum(p.numel() for p in tr.model.parameters() if p.requires_grad)}
        if profile and device.startswith("cuda"):
            from kernel_table import kernel_table

            kernel_table(lambda: [tr.train_step() for _ in range(2)],
                         f"latentformer, {'LoRA r=%d' % lora_rank if lora_rank else 'every weight'}: two steps", gaps=12)
        del tr
    return out, rows


def reference(ckpt: Path, rows: list, lora_rank: int, compile: bool, warmup: int, device: str, kind: str,
              step_times: bool = False) -> dict:
    """trl's SFTTrainer (kind "sft") or transformers.Trainer ("trainer"), + peft, on the same weights and rows.
    `step_times`: print each step's seconds to stderr as it ends (where compilation goes)."""
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from latentformer.checkpoint import load_model
    from latentformer.interop.hf import to_hf_state
    from latentformer.interop.hf_config import to_hf_config

    ours_model = load_model(ckpt)
    hf_cfg = to_hf_config(ours_model.config, dtype="float32")
    config = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version")})
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(to_hf_state(ours_model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2.0 * lora_rank, target_modules=HF_TARGETS))
    # our rows are shifted (y = next token of x); transformers shifts labels itself: the same T positions
    examples = [{"input_ids": x[b], "labels": torch.cat([torch.tensor([IGNORE_INDEX]), y[b, :-1]])}
                for x, y in rows for b in range(len(x))]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            dt = time.perf_counter() - self.t0
            if step_times:
                print(f"  {kind} step {state.global_step}: {dt:.3f} s", file=sys.stderr, flush=True)
            if state.global_step > warmup:
                times.append(dt)

    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, per_device_train_batch_size=len(rows[0][0]), max_steps=len(rows),
                      learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                      optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
                      logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0,
                      torch_compile=compile, seed=0, disable_tqdm=True, gradient_checkpointing=False)
        _reset_memory(device)
        if kind == "sft":
            # pre-tokenized rows with labels: SFTTrainer uses them as they are (no template, no re-tokenizing);
            # its config turns gradient checkpointing on by default, off here as on our side
            from datasets import Dataset
            from tokenizers import Tokenizer, models
            from transformers import PreTrainedTokenizerFast
            from trl import SFTConfig, SFTTrainer

            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                          pad_token="<pad>", eos_token="<eos>")
            data = Dataset.from_list([{k: v.tolist() for k, v in e.items()} for e in examples])
            trainer = SFTTrainer(model=model, args=SFTConfig(**common, max_length=rows[0][0].shape[1], packing=False,
                                                              shuffle_dataset=False),
                                 train_dataset=data, processing_class=tok, callbacks=[Clock()])
        else:
            from transformers import Trainer as HFTrainer, TrainingArguments

            trainer = HFTrainer(model=model, args=TrainingArguments(**common, remove_unused_columns=False),
                                train_dataset=examples, callbacks=[Clock()])
        trainer.train()
    seq_len, batch = rows[0][0].shape[1], len(rows[0][0])
    return {"tokens/s": seq_len * batch / statistics.median(times), "mem_gb": _peak_gb(device),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="conversations per step (one micro-batch)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile on both sides (train.compile / torch_compile)")
    ap.add_argument("--runs", default="every,lora", help="comma-separated: every (every weight), lora")
    ap.add_argument("--reference", choices=("sft", "trainer", "none"), default="sft",
                    help="trl's SFTTrainer (default) or transformers' Trainer, each with peft for LoRA; none: ours alone")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of our side (with --compile), e.g. reduce-overhead")
    ap.add_argument("--profile", action="store_true", help="CUDA: our side's kernels and GPU idle time over two steps")
    ap.add_argument("--step-times", action="store_true", help="print each reference step's seconds as it ends")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, 64 tokens x 4, 3 steps: a CPU check that it runs")
    args = ap.parse_args()
    if not set(args.runs.split(",")) <= {"every", "lora"}:
        raise SystemExit(f"--runs takes every and/or lora, got {args.runs!r}")
    if args.tiny:
        args.seq_len, args.batch, args.steps, args.warmup, args.lora_rank = 64, 4, 3, 1, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {'tiny model' if args.tiny else 'SmolLM2-135M architecture'}, "
          f"{args.batch} x {args.seq_len} tokens per step, {args.steps} timed steps", flush=True)
    theirs = "trl SFTTrainer (+ peft)" if args.reference == "sft" else "transformers Trainer (+ peft)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = save_checkpoint(Path(tmp) / "base", Transformer(ModelConfig(**(TINY if args.tiny else SMOLLM2))),
                               load_tokenizer("byte"))
        data = Path(tmp) / "chats.jsonl"
        write_conversations(data, args.seq_len, 2 * args.batch * (args.warmup + args.steps))
        runs = {"every": ("every weight", 0), "lora": (f"LoRA r={args.lora_rank}", args.lora_rank)}
        for label, rank in (runs[r] for r in args.runs.split(",")):
            mine, batches = ours(ckpt, data, args.seq_len, args.batch, rank, args.compile, args.steps, args.warmup, device,
                                 args.profile, args.compile_mode)
            print(f"latentformer, {label}: {mine}", flush=True)
            if args.reference == "none":
                continue
            ref = reference(ckpt, batches, rank, args.compile, args.warmup, device, args.reference, args.step_times)
            print(f"{theirs}, {label}: {ref}", flush=True)
            rows.append((label, mine, ref))
    if not rows:
        return
    print(f"\n| fine-tuning ({name}, {args.batch} x {args.seq_len}{', compiled' if args.compile else ''}) | "
          f"latentformer tokens/s | {theirs} tokens/s | ratio | peak GB (ours / theirs) | trainable parameters |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, mine, ref in rows:
        print(f"| {label} | {mine['tokens/s']:,.0f} | {ref['tokens/s']:,.0f} | {mine['tokens/s'] / ref['tokens/s']:.2f}x | "
              f"{mine['mem_gb']:.1f} / {ref['mem_gb']:.1f} | {mine['trainable']:,} / {ref['trainable']:,} |")


if __name__ == "__main__":
    main()
