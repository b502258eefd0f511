"""The Lightning adapter trains the same model (skipped when lightning is not installed)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")

from latentformer.config import ModelConfig  # noqa: E402
from latentformer.data.dataset import RandomWindows, TokenData, eval_batches  # noqa: E402
from latentformer.lightning import LatentformerModule  # noqa: E402
from latentformer.train.config import TrainConfig  # noqa: E402

from .conftest import TINY_MODEL  # noqa: E402


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_lightning_module_learns(sotu_dir, tmp_path, optimizer):
    torch.manual_seed(0)
    data = TokenData(sotu_dir)
    train = RandomWindows(data.tokens("train"), batch_size=16, block_size=32, seed=0)
    # batch_size=None: the loaders hand over the prepared batches as they are
    batches = DataLoader([next(train) for _ in range(40)], batch_size=None)
    val = DataLoader(list(eval_batches(data.tokens("val"), 16, 32)), batch_size=None)
    module = LatentformerModule(ModelConfig(**TINY_MODEL),
                                TrainConfig(lr=3e-3, warmup_steps=2, max_steps=40, optimizer=optimizer))
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0, gradient_clip_val=1.0)
    before = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    trainer.fit(module, batches, val)
    after = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    assert after < before - 0.5


@pytest.mark.parametrize("field", [dict(teacher="runs/gqa"), dict(fp8=True), dict(lora_rank=8)])
def test_train_fields_it_does_not_implement_are_refused(field):
    """Never silently ignored: a run configured to distill, train in FP8 or train LoRA adapters is refused."""
    with pytest.raises(ValueError, match=f"train.{next(iter(field))} is not implemented by the Lightning adapter"):
        LatentformerModule(ModelConfig(**TINY_MODEL), TrainConfig(**field))
