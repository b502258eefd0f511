"""The UI's model card: what a model is, and what its KV cache costs next to an MHA model.

Pure functions of a `Transformer` (a real one, or one built on the meta device from a config:
nothing here reads weights). The figures come from the model's own accounting
(`num_params`, `kv_cache_bytes_per_token`), so the card and `latentformer info` agree.

The MHA equivalent of a model is the same configuration with standard multi-head attention:
`attention="mha"`, `n_kv_heads = n_heads`, `head_dim = d_model // n_heads`, the MLA-only fields
unset, every other field (d_model, n_heads, n_layers, vocabulary, feed-forward, MoE, context)
unchanged. Its cache holds a key and a value per head per layer, 2 x n_layers x n_heads x
head_dim values per token, against MLA's (kv_lora_rank + qk_rope_head_dim) x n_layers
(DeepSeek-V2 §2.1.4). For an MHA model it is the model itself when its head_dim is d_model // n_heads.

"Largest batch at context C within M GiB" counts whole sequences of C cached tokens that fit in
M GiB (2**30 bytes) of memory set aside for the cache: floor(M x 2**30 / (bytes_per_token x C)).
Weights and activations are not in M: it is the memory left for the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentformer.config import ModelConfig
from latentformer.model.attention import attention_module
from latentformer.model.transformer import Transformer

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class ModelCard:
    """The side panel's figures for one model and its MHA equivalent (cache bytes in `cache_dtype`)."""

    attention: str  # e.g. "MLA (kv_lora_rank 96, rope 16, 4 heads)"
    parameters: int
    active_parameters: int
    context: int  # max_seq_len
    n_layers: int
    d_model: int
    cache_dtype: str
    kv_bytes_per_token: int
    mha_parameters: int | None  # the mha_* fields are None when the config has no MHA equivalent
    mha_active_parameters: int | None
    mha_kv_bytes_per_token: int | None

    @property
    def cache_ratio(self) -> float | None:
        """How many times fewer cache bytes per token than the MHA equivalent (1.0 for MHA itself)."""
        return None if self.mha_kv_bytes_per_token is None else self.mha_kv_bytes_per_token / self.kv_bytes_per_token


def attention_summary(cfg: ModelConfig) -> str:
    """One line naming the attention and its cache-relevant shape (the attention module's `describe`)."""
    return attention_module(cfg).describe(cfg)


def mha_equivalent(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with standard MHA attention (module docstring); ValueError when d_model // n_heads is no valid head_dim."""
    head_dim = cfg.d_model // cfg.n_heads
    if head_dim < 1:
        raise ValueError(f"d_model={cfg.d_model} < n_heads={cfg.n_heads}: no MHA equivalent")
    return cfg.replace(attention="mha", n_kv_heads=cfg.n_heads, head_dim=head_dim, qkv_bias=False)


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model of `cfg` on the meta device: its accounting without allocating weights."""
    with torch.device("meta"):
        return Transformer(cfg)


def model_card(model: Transformer, cache_dtype: torch.dtype = torch.bfloat16) -> ModelCard:
    """The card of `model`, cache bytes counted in `cache_dtype`."""
    cfg = model.config
    try:
        mha = meta_model(mha_equivalent(cfg))
    except ValueError:  # e.g. an odd d_model // n_heads with rope on
        mha = None
    return ModelCard(
        attention=attention_summary(cfg),
        parameters=model.num_params(),
        active_parameters=model.num_params(active=True),
        context=cfg.max_seq_len,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        cache_dtype=str(cache_dtype).removeprefix("torch."),
        kv_bytes_per_token=model.kv_cache_bytes_per_token(cache_dtype),
        mha_parameters=None if mha is None else mha.num_params(),
        mha_active_parameters=None if mha is None else mha.num_params(active=True),
        mha_kv_bytes_per_token=None if mha is None else mha.kv_cache_bytes_per_token(cache_dtype),
    )


def largest_batch(bytes_per_token: int, context: int, memory_gib: float) -> int:
    """Sequences of `context` cached tokens that fit in `memory_gib` GiB: floor(M x 2**30 / (bytes x C))."""
    if bytes_per_token < 1 or context < 1:
        raise ValueError(f"bytes_per_token and context must be >= 1, got {bytes_per_token} and {context}")
    if memory_gib < 0:
        raise ValueError(f"memory must be >= 0 GiB, got {memory_gib}")
    return int(memory_gib * GIB) // (bytes_per_token * context)  # whole bytes, integer division: no float rounding


def cache_curve(card: ModelCard, max_context: int, points: int = 17) -> dict[str, list[float]]:
    """Chart data: cache MiB of one sequence vs context, `points` contexts from 0 to `max_context`.

    Keys: "context" (tokens), "this model" and, when it exists, "MHA equivalent" (MiB).
    """
    if max_context < 1 or points < 2:
        raise ValueError(f"max_context must be >= 1 and points >= 2, got {max_context} and {points}")
    contexts = [round(i * max_context / (points - 1)) for i in range(points)]
    data = {"context": contexts, "this model": [c * card.kv_bytes_per_token / MIB for c in contexts]}
    if card.mha_kv_bytes_per_token is not None:
        data["MHA equivalent"] = [c * card.mha_kv_bytes_per_token / MIB for c in contexts]
    return data
