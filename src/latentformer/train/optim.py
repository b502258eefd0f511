"""AdamW with weight decay on weight matrices only.

Norm gains, biases and (unless `train.decay_embeddings`) embedding tables are excluded: decaying
them pulls scales toward zero without regularizing anything useful (Loshchilov & Hutter 2019;
the nanoGPT/GPT-3 convention).
"""

from __future__ import annotations

import torch
from torch import nn

from latentformer.train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and everything else (not decayed). Tied weights appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields shared tensors once
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and (cfg.decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW; the fused CUDA kernel when the parameters live on a GPU (one launch per step)."""
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device_type == "cuda",
    )
