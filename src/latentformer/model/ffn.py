"""Dense feed-forward blocks: SwiGLU (Shazeer 2020) and the GELU MLP (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentformer.config import ModelConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x [..., d] -> [..., d]."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))); x [..., d] -> [..., d]."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def make_ffn(cfg: ModelConfig, d_ff: int) -> nn.Module:
    return SwiGLU(cfg.d_model, d_ff) if cfg.ffn == "swiglu" else GeluMLP(cfg.d_model, d_ff)
