"""FP8 training (`train.fp8`): the blocks' linear layers through torchao's float8 training, the output layer in the loss.

Each selected `nn.Linear` becomes torchao's `Float8Linear`: its three matmuls (forward, grad of
the input, grad of the weight) cast their operands to float8 with dynamic scales and run on the FP8
tensor cores (`torch._scaled_mm`); the weights, the optimizer and the checkpoints stay as they
were (the parameters keep their names, dtype and values: a checkpoint loads into a plain model).
DeepSeek-V3 trains in FP8 with fine-grained (1x128 / 128x128 block) scales; torchao offers two
recipes on Hopper (`train.fp8_recipe`):

- `tensorwise`: one scale per tensor, the fastest;
- `rowwise`: one scale per row of each operand (closer to DeepSeek's fine-grained scaling), more
  robust to outliers, somewhat slower.

Which linears (`train.fp8_layers`): `ffn`, the default, converts those of the feed-forward layers
(dense FFNs, MoE shared experts, the MTP blocks' FFNs); `all` adds attention's projections and the MTP modules' input projection.
Each FP8 matmul pays for its casts: an amax reduction and a cast pass over each operand, the
activations and their gradients included, which in bf16 are not there. At latentformer-348m's widths
(d_model 1280) attention's projections lose more to those passes than their matmuls gain: on one H100,
all layers train at 1.07x bf16's tokens/s, the FFNs alone at 1.10x (benchmarks/RESULTS.md). `all` is
for wider models, where the matmuls grow faster than the casts.

The output layer (`train.fp8_output`, on by default: with it 348m trains at 1.17x bf16, 1.10x without) is not a
`Float8Linear`: the fused loss reads its weight directly, so `convert_to_fp8` sets the model's
`fp8_output` and the loss runs its three matmuls in float8 itself (model/loss.py). Its gradient
needs no amax pass: a softmax minus a one-hot is bounded, so one static scale serves, and the kernel
that forms it writes float8 directly.

Left in bf16, as torchtitan leaves them: the embedding, norms, the MoE router (fp32 by design) and
the routed experts (grouped weights, not `nn.Linear`), and any linear whose input or output width
is not a multiple of 16 (`_scaled_mm`'s constraint).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from torch import nn

from latentformer.train.config import FP8_LAYERS, FP8_RECIPES

SKIPPED = ("lm_head",)  # module names left in bf16 whatever their shape (see the module docstring)


def check_fp8(device: torch.device) -> None:
    """ValueError (one line) unless `device` is a GPU with FP8 tensor cores and torchao is installed."""
    if device.type != "cuda":
        raise ValueError(f"train.fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9: "
                         f"Ada, Hopper, Blackwell); this run is on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"train.fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    _torchao()


def _torchao():
    # torchao's import logs a warning for each of its optional C++ kernel libraries built for another
    # torch, and torch's pytree one for an enum it registers; float8 training needs none of it
    # (torch._scaled_mm does the matmuls)
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        from torchao import float8
    except ModuleNotFoundError:
        raise ValueError("train.fp8 needs torchao: pip install 'latentformer[fp8]'") from None
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return float8


def selected(module: nn.Module, name: str, layers: str = "ffn") -> bool:
    """Whether the linear `name` trains in FP8 under `train.fp8_layers` = `layers` (see the module
    docstring); `ffn` takes the linears inside a block's `ffn` module."""
    return (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in SKIPPED
            and (layers == "all" or "ffn" in name.split(".")[:-1])
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False, layers: str = "ffn",
                   output: bool = False) -> list[str]:
    """Swap `model`'s selected linears for torchao's Float8Linear in place; returns their names.
    `emulate` computes the float8 matmuls in higher precision (torchao's CPU test mode: same casts
    and scales, no FP8 hardware). `output`: the fused loss's output layer in float8 too (`lm_head` is
    then among the names; model/loss.py). Apply before torch.compile and before DDP/FSDP wrapping."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"train.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}")
    if layers not in FP8_LAYERS:
        raise ValueError(f"train.fp8_layers must be one of {', '.join(FP8_LAYERS)}, got {layers!r}")
    float8 = _torchao()
    keep = functools.partial(selected, layers=layers)
    names = [name for name, module in model.named_modules() if keep(module, name)]
    float8.convert_to_float8_training(model, config=float8_config(recipe, emulate), module_filter_fn=keep)
    if output:
        model.fp8_output = True
        names.append("lm_head")
    return names


def float8_config(recipe: str, emulate: bool = False):
    """torchao's `Float8LinearConfig` for `recipe` (its own recipe, unchanged)."""
    config = _torchao().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config
