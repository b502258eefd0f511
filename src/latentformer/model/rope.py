"""Rotary position embeddings (Su et al. 2021) with YaRN (Peng et al. 2023), linear and Llama 3.1 scaling,
and the additive position embeddings (learned absolute; learnable scaled-and-shifted sinusoid).

Layouts: `interleave=False` rotates pairs (x_i, x_{i+D/2}) (GPT-NeoX/Llama);
`interleave=True` rotates adjacent pairs (x_{2i}, x_{2i+1}) as DeepSeek's checkpoints do.
The interleaved form returns its output de-interleaved ([rotated evens, rotated odds]),
exactly as transformers' DeepseekV3 does: queries and keys get the same permutation, so
every dot product q·k is unchanged and cached keys stay consistent.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from latentformer.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the cos/sin attention factor (1.0 without YaRN)."""
    dim = cfg.rope_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_scaling == "linear":
        return 1.0 / pos_freqs / cfg.rope_scaling_factor, 1.0
    if cfg.rope_scaling == "llama3":
        return _llama3_inv_freq(1.0 / pos_freqs, cfg), 1.0
    if cfg.yarn_factor <= 1.0:  # no scaling, or dynamic NTK (the default frequencies up to max_seq_len)
        return 1.0 / pos_freqs, 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between the
    # dims that complete beta_fast and beta_slow rotations over the original context.
    factor, orig = cfg.yarn_factor, cfg.yarn_original_max_seq_len

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        attention_factor = mscale(factor, cfg.yarn_mscale) / mscale(factor, cfg.yarn_mscale_all_dim)
    else:
        attention_factor = mscale(factor)
    return inv_freq, attention_factor


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's scaling (Llama Team 2024, "The Llama 3 Herd of Models"; as transformers'
    `_compute_llama3_parameters`): wavelengths longer than original/low_freq_factor are stretched by
    the factor, those shorter than original/high_freq_factor kept, the band between interpolated."""
    factor, orig = cfg.rope_scaling_factor, cfg.llama3_original_max_seq_len
    low, high = cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """positions [B|1, T] -> (cos, sin), each [B|1, T, D/2] in fp32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived: never checkpointed

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B|1, T, D/2]; computed in fp32, returned in x's dtype."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def sinusoid_inv_freq(d_model: int) -> torch.Tensor:
    """Frequencies [d_model/2] of the Vaswani et al. sin/cos table."""
    return torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))


class LearnedPositions(nn.Module):
    """Absolute learned position embeddings: positions [B|1, T] -> [B|1, T, d_model]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.d_model))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class ScaledSinusoidPositions(nn.Module):
    """sin/cos table (Vaswani et al. 2017) times a learnable per-dimension scale plus a learnable shift."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(cfg.d_model))
        self.shift = nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("inv_freq", sinusoid_inv_freq(cfg.d_model), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        ang = positions[..., None].float() * self.inv_freq
        table = torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)  # [.., T, d_model]: sin, cos interleaved
        return table * self.scale + self.shift
