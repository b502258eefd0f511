"""train.fp8 (torchao float8 training) on the CPU, in torchao's emulation mode: the same casts and
scales as on the FP8 tensor cores, the matmuls in higher precision. What layers train in FP8, that
checkpoints stay plain, that the trainer applies it and still learns, and the one-line refusal where
there are no FP8 tensor cores (tests/train/test_cli.py)."""

from __future__ import annotations

import pytest
import torch

from latentformer.checkpoint import load
from latentformer.config import ModelConfig
from latentformer.model.transformer import Transformer
from latentformer.train import fp8
from latentformer.train.trainer import Trainer

from .conftest import TINY_MODEL, run_config

pytest.importorskip("torchao")


@pytest.mark.parametrize("layers,output", [("ffn", True), ("all", False)])
def test_the_blocks_linears_train_in_fp8_and_the_checkpoint_format_stays(layers, output):
    """`ffn`: the feed-forward linears become Float8Linear; `all`: every block linear whose widths are
    multiples of 16 (kv_a_proj's 32 + 8 = 40 outputs are not). The output layer stays a Linear: with
    `output` the fused loss runs its matmuls in float8 (model.fp8_output). Parameter names and values
    are unchanged, so the state dict loads into a plain model."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_MODEL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = fp8.convert_to_fp8(model, "tensorwise", emulate=True, layers=layers, output=output)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_layer = ["attn.q_proj", "attn.kv_b_proj", "attn.o_proj"] * (layers == "all") + ["ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"]
    blocks = [f"layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert names == blocks + ["lm_head"] * output and model.fp8_output == output
    assert {n for n, kind in kinds.items() if kind == "Float8Linear"} == set(blocks)
    assert kinds["lm_head"] == "Linear" and kinds["layers.0.attn.kv_a_proj"] == "Linear"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    Transformer(ModelConfig(**TINY_MODEL)).load_state_dict(after)


def test_ffn_takes_the_shared_experts_and_the_dense_layers_not_the_router_or_the_mtp_projection():
    """In a MoE model with MTP, `ffn` converts the dense layer's FFN, the shared experts and the MTP
    block's FFN; the router (a Parameter), the routed experts (3-D) and the MTP input projection stay."""
    cfg = ModelConfig(**{**TINY_MODEL, "n_layers": 2, "n_routed_experts": 4, "n_shared_experts": 1, "moe_d_ff": 32,
                         "first_k_dense_layers": 1, "mtp_depth": 1})
    model = Transformer(cfg)
    names = fp8.convert_to_fp8(model, "tensorwise", emulate=True, layers="ffn")
    ffn = ["gate_proj", "up_proj", "down_proj"]
    assert names == [f"{part}.{n}" for part in ("layers.0.ffn", "layers.1.ffn.shared", "mtp.0.block.ffn") for n in ffn]
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["mtp.0.eh_proj"] == kinds["layers.1.attn.q_proj"] == "Linear" and kinds["layers.1.ffn.router"] == "Router"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_fp8_forward_is_close_to_the_plain_one(recipe):
    """e4m3 keeps 3 mantissa bits: the logits move by a few percent of their spread, not more."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_MODEL))
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (4, 32))
    plain = model(tokens)
    fp8.convert_to_fp8(model, recipe, emulate=True)
    err = (model(tokens) - plain).abs().max() / plain.std()
    assert 0 < err < 0.1, err


def test_the_trainer_applies_fp8_and_learns_as_bf16_would(sotu_dir, tmp_path, monkeypatch):
    """With the device check passed and the conversion emulated, 40 steps reach a validation loss
    within 2% of the same run without FP8, and the saved checkpoint is a plain model's."""
    monkeypatch.setattr(fp8, "check_fp8", lambda device: None)
    convert = fp8.convert_to_fp8
    monkeypatch.setattr(fp8, "convert_to_fp8", lambda model, recipe, layers, output: convert(
        model, recipe, emulate=True, layers=layers, output=output))
    runs = {}
    for on in (False, True):
        cfg = run_config(sotu_dir, max_steps=40, batch_tokens=512, micro_batch_size=16, warmup_steps=4, fp8=on,
                         fp8_output=on)
        trainer = Trainer(cfg, tmp_path / f"fp8-{on}")
        assert any(type(m).__name__ == "Float8Linear" for m in trainer.model.modules()) == on
        assert trainer.model.fp8_output == on
        runs[on] = trainer.fit()["val"]["loss"]
    assert runs[True] == pytest.approx(runs[False], rel=0.02)
    model, _ = load(tmp_path / "fp8-True")
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())
