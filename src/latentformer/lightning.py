"""PyTorch Lightning adapter (optional extra: `pip install latentformer[lightning]`).

    from latentformer.lightning import LatentformerModule
    module = LatentformerModule(ModelConfig.preset("tiny"), TrainConfig(lr=1e-3, max_steps=1000))
    lightning.Trainer(max_steps=1000, gradient_clip_val=1.0).fit(module, train_loader, val_loader)

Batches are `(x, y)` int64 [B, T] (train) and `(x, y)` or `(x, y, n_valid)` (validation, e.g.
from `latentformer.data.dataset.eval_batches`): the validation loss is the exact mean over all
targets of the epoch. The optimizer is the project's AdamW (decay on matrices only) with the
`train.schedule` learning rate stepped per optimizer step; the MoE bias update runs after each
optimizer step. Lightning owns devices, precision, accumulation and distribution. Distillation
(`train.teacher`), FP8 and LoRA are `latentformer train`'s only: a config asking for one is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lightning.pytorch as pl
except ImportError as e:  # the adapter is optional; say how to get it
    raise ImportError("latentformer.lightning needs PyTorch Lightning: pip install 'latentformer[lightning]'") from e

from latentformer.config import ModelConfig, from_dict, to_dict
from latentformer.model.transformer import IGNORE_INDEX, Transformer
from latentformer.train.config import TrainConfig
from latentformer.train.optim import build_optimizer
from latentformer.train.schedule import lr_at


# train fields of `latentformer train` that this adapter does not implement -> their "off" value
NOT_HERE = {"teacher": "", "fp8": False, "lora_rank": 0}


class LatentformerModule(pl.LightningModule):
    def __init__(self, model_config: ModelConfig | dict, train_config: TrainConfig | dict | None = None) -> None:
        super().__init__()
        model_config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
        train_config = train_config or TrainConfig()
        train_config = train_config if isinstance(train_config, TrainConfig) else from_dict(TrainConfig, train_config)
        for name, off in NOT_HERE.items():
            if getattr(train_config, name) != off:
                raise ValueError(f"train.{name} is not implemented by the Lightning adapter (it would be ignored): "
                                 "use `latentformer train`, or leave it unset")
        self.save_hyperparameters({"model_config": model_config.to_dict(), "train_config": to_dict(train_config)})
        self.model = Transformer(model_config)
        self.train_config = train_config
        self._val = torch.zeros(2, dtype=torch.float64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        out = self.model(x, y)
        self.log("train/loss", out.loss, prog_bar=True)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss)
        if out.mtp_loss is not None:
            self.log("train/mtp_loss", out.mtp_loss)
        return out.objective(self.train_config.mtp_weight)

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        self._val[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").double()
        self._val[1] += (y != IGNORE_INDEX).sum()

    def on_validation_epoch_end(self) -> None:
        totals = self.all_gather(self._val)
        totals = totals.reshape(-1, 2).sum(0) if totals.dim() > 1 else totals
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        self.log("val/loss", loss, prog_bar=True, rank_zero_only=True)
        self.log("val/perplexity", math.exp(min(loss, 700.0)), rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.train_config
        optimizer = build_optimizer(self.model, cfg, self.device.type)
        # LambdaLR multiplies the base lr (cfg.lr) by this factor
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step) / cfg.lr if cfg.lr else 0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.model.update_router_bias()  # after each optimizer step (auxiliary-loss-free balancing)
