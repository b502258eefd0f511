"""LoRA through peft (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

`apply_lora(model, cfg)` freezes every weight of a Transformer and adds rank-r adapters to the
projections `train.lora_targets` names (leaf names such as q_a_proj, kv_b_proj, o_proj, gate_proj;
empty: every nn.Linear of the blocks, which never includes the embedding, the output layer or the
MoE routers and routed experts, none of them nn.Linear there). peft's `LoraModel` injects them in
place: the model stays the same object and each targeted nn.Linear becomes peft's `lora.Linear`,
which keeps the original as `base_layer` and computes W x + (alpha / r) B A x, with A [r, in] drawn
at random and B [out, r] zero, so training starts from the model as loaded.

The model's parameter names change while the adapters are in (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`). Checkpoints are written from `merged_state`: the plain names and
W + delta, computed out of place (peft's `get_delta_weight`, the same sum its merge makes), so every
checkpoint of a LoRA run is an ordinary model checkpoint while training goes on with W untouched.
`adapter_state` / `load_adapter_state` carry the A and B matrices for exact resume; `merge` ends a
run with peft's `merge_and_unload`.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from latentformer.train.config import TrainConfig

ADAPTER = "default"  # peft's adapter name
INSTALL = "pip install 'latentformer[finetune]' (or pip install peft)"


def require_peft() -> None:
    """ValueError naming the install command when peft is missing."""
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"LoRA (train.lora_rank > 0) needs the peft library: {INSTALL}")


def target_modules(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Full names of the nn.Linear modules of `model.layers` that get adapters; ValueError naming a
    `train.lora_targets` entry that matches none."""
    linears = {f"layers.{name}": name.rsplit(".", 1)[-1] for name, m in model.layers.named_modules()
               if isinstance(m, nn.Linear)}
    wanted = set(cfg.lora_targets)
    missing = sorted(wanted - set(linears.values()))
    if missing:
        raise ValueError(f"train.lora_targets: no projection named {missing[0]!r} in this model's layers "
                         f"(its projections: {', '.join(sorted(set(linears.values())))})")
    return [name for name, leaf in linears.items() if not wanted or leaf in wanted]


def adapter_parameters(model: nn.Module, cfg: TrainConfig) -> int:
    """Trainable parameters the adapters add: r (in + out) per targeted projection (a meta model will do)."""
    modules = dict(model.named_modules())
    return sum(cfg.lora_rank * (modules[name].in_features + modules[name].out_features)
               for name in target_modules(model, cfg))


def apply_lora(model: nn.Module, cfg: TrainConfig):
    """Freeze `model` and inject the adapters in place; returns peft's LoraModel (for `merge`)."""
    require_peft()
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=target_modules(model, cfg), bias="none")
    return LoraModel(model, config, ADAPTER)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state under its plain names, each adapted weight replaced by W + delta (module doc)."""
    layers = _lora_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if ".lora_" in key:
            continue
        if owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
            if leaf == "weight":
                value = value + layers[owner].get_delta_weight(ADAPTER).to(value.dtype)
        state[f"{owner}.{leaf}"] = value
    return state


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' A and B matrices by parameter name (what a LoRA run trains)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if ".lora_" in name}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapters into the injected ones; ValueError naming `source` when they do not match."""
    params = dict(model.named_parameters())
    expected = {name for name in params if ".lora_" in name}
    if set(state) != expected or any(state[k].shape != params[k].shape for k in expected):
        raise ValueError(f"{source}: the saved adapters do not match this run's LoRA configuration "
                         "(train.lora_rank / lora_targets changed?)")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def merge(lora_model) -> nn.Module:
    """Fold the adapters into the weights (peft's merge_and_unload, safe_merge: a merged weight is a new
    tensor, so anything derived from the old one, such as the decode layer's absorbed MLA weights, sees
    the change) and return the plain model with every parameter trainable again."""
    model = lora_model.merge_and_unload(safe_merge=True)
    model.requires_grad_(True)
    return model
