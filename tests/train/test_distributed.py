"""DDP / FSDP2 on 2 CPU processes (torchrun, gloo) == one process with grad_accum=2 at the same global batch,
with AdamW, with Muon (on a MoE model too: each rank steps its own routed experts), and distilling from a teacher."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import torch

from latentformer import ModelConfig, Transformer
from latentformer.checkpoint import load_model, read_config, save_checkpoint
from latentformer.cli import main
from latentformer.data.tokenizer import load_tokenizer

from .conftest import TINY_MODEL, TINY_MODEL_ARGS

ARGS = [*TINY_MODEL_ARGS, "--train.device", "cpu", "--train.eval_batch_size", "64", "--train.threads", "1", "--train.seq_len", "32",
        "--train.micro_batch_size", "4", "--train.batch_tokens", "256", "--train.max_steps", "4",
        "--train.warmup_steps", "1", "--train.eval_interval", "2", "--train.max_time_minutes", "0",
        "--train.progress", "false", "--train.tensorboard", "false", "--no-sample"]


MOE = ["--model.n_routed_experts", "4", "--model.experts_per_token", "2", "--model.moe_d_ff", "32",
       "--model.first_k_dense_layers", "1"]


@pytest.mark.parametrize("parallel,optimizer,teacher", [("ddp", "adamw", False), ("fsdp", "adamw", False), ("ddp", "muon", False),
                                                       ("fsdp", "muon", False), ("fsdp", "muon-moe", False),
                                                       ("ddp", "adamw", 0.5), ("fsdp", "adamw", 1.0)])
def test_two_processes_match_one_process(sotu_dir, tmp_path, parallel, optimizer, teacher):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    optimizer, _, moe = optimizer.partition("-")
    extra = ["--train.optimizer", optimizer, *(MOE if moe else [])]
    if teacher:  # the KL to another model's distributions (a replica on each rank): half the loss, or all of it
        torch.manual_seed(3)
        path = save_checkpoint(tmp_path / "teacher", Transformer(ModelConfig(**{**TINY_MODEL, "init_std": 0.1})),
                               load_tokenizer(sotu_dir))
        extra += ["--train.teacher", str(path), "--train.distill_weight", str(teacher)]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
         "-m", "latentformer", "train", "--data", str(sotu_dir), "--out", str(tmp_path / "ddp"), *ARGS,
         "--train.parallel", parallel, *extra],
        env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "4 x 32 x 1 accum x 2 ranks" in ddp.stdout + ddp.stderr
    assert main(["train", "--data", str(sotu_dir), "--out", str(tmp_path / "one"), *ARGS, *extra]) == 0

    a = load_model(tmp_path / "ddp" / "checkpoints" / "step_4").state_dict()
    b = load_model(tmp_path / "one" / "checkpoints" / "step_4").state_dict()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    # FSDP2 + Muon: torch's Newton-Schulz on the sharded DTensor is the global iteration, in bf16; one
    # CPU process runs it in fp32 (BatchedMuon's CPU default): 2.0e-4 measured after 4 steps whose
    # Muon updates are ~4e-4 each; DDP's replicated Muon is exact
    assert diff < (5e-4 if (parallel, optimizer) == ("fsdp", "muon") else 1e-5), diff
    if moe:  # the routed experts' Muon steps (each rank its own): as in one process, to 1% of how far they moved (measured 0.03%)
        torch.manual_seed(1337)  # the run's seed: the initial weights
        init = Transformer(read_config(tmp_path / "one" / "checkpoints" / "step_4")).state_dict()
        for k in ("layers.1.ffn.experts.gate_up_proj", "layers.1.ffn.experts.down_proj"):
            assert (a[k] - b[k]).abs().max() < 0.01 * (b[k] - init[k]).abs().max(), k
