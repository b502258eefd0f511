"""The memory estimate of a training run against the measured peak, the one-line refusal of a run
that cannot fit, and no run directory left by a run that saved nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import latentformer as lf
from latentformer.cli import main
from latentformer.config import ModelConfig
from latentformer.train.memory import MemoryEstimate, check_fits, training_bytes
from latentformer.train.trainer import Trainer

from .conftest import TINY_MODEL_ARGS, run_config

# one process per measurement: VmHWM is its memory's high-water mark (ru_maxrss is not: Linux keeps
# it across exec, so a child of a large pytest process starts at its parent's peak)
PEAK = """
import json, sys, torch
from latentformer.config import ModelConfig
from latentformer.model.transformer import Transformer

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

torch.set_num_threads(1)
cfg, batch = ModelConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
before = hwm()
model = Transformer(cfg)
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
for _ in range(2):
    model(x, x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"bytes": (hwm() - before) * 1024, "params": model.num_params()}))
"""

SHAPES = {
    "mla": dict(attention="mla", kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
    "mha": dict(attention="mha", n_kv_heads=4, head_dim=64),
}


@pytest.mark.parametrize("kind", SHAPES)
def test_estimate_is_within_25_percent_of_the_measured_peak(kind):
    cfg = dict(vocab_size=4096, n_layers=2, d_model=256, n_heads=4, max_seq_len=1024, d_ff=1024, **SHAPES[kind])
    out = subprocess.run([sys.executable, "-c", PEAK, json.dumps(cfg), "4"], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(lf.__file__).parents[1]), "PATH": ""})
    measured = json.loads(out.stdout)
    estimate = training_bytes(ModelConfig(**cfg), measured["params"], micro_batch_size=4, seq_len=1024, dtype="fp32",
                              device_type="cpu")
    assert 0.75 < estimate.total / measured["bytes"] < 1.25, (estimate, measured)


def test_sharding_and_checkpointing_shrink_the_estimate():
    cfg = ModelConfig.preset("mla-125m")
    plain = training_bytes(cfg, 10**8, micro_batch_size=8, seq_len=1024, dtype="bf16", device_type="cuda")
    assert training_bytes(cfg, 10**8, micro_batch_size=8, seq_len=1024, dtype="bf16", device_type="cuda", shards=4).state == plain.state // 4
    assert training_bytes(cfg, 10**8, micro_batch_size=8, seq_len=1024, dtype="bf16", device_type="cuda",
                          activation_checkpointing=True).activations < plain.activations / 5
    check_fits(MemoryEstimate(100, 0, 0), 90, torch.device("cpu"), "")  # within the margin
    with pytest.raises(ValueError, match="--train.micro_batch_size"):
        check_fits(MemoryEstimate(100, 20, 0), 90, torch.device("cpu"), "")


def test_cli_refuses_a_run_that_cannot_fit_in_one_line(sotu_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(sotu_dir), "--out", str(out), *TINY_MODEL_ARGS, "--train.device", "cpu",
               "--train.seq_len", "64", "--train.micro_batch_size", "1000000", "--train.batch_tokens", "64000000"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("latentformer train: error: this run needs about") and "GB available" in err
    assert not out.exists()


def test_a_run_that_saved_nothing_leaves_no_directory(sotu_dir, tmp_path):
    def fail(trainer, step):
        if step == 3:
            raise RuntimeError("boom")

    cfg = run_config(sotu_dir, max_steps=8)
    for interval, kept in ((0, False), (2, True)):  # a checkpoint at step 2 keeps the run
        run = tmp_path / f"run{interval}"
        cfg.train.checkpoint_interval = interval
        with pytest.raises(RuntimeError, match="boom"):
            Trainer(cfg, run, on_step=[fail]).fit()
        assert run.exists() == kept
