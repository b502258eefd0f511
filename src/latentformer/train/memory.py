"""How much memory a training run needs, against what the device has: checked before the model is
built, so a run that clearly cannot fit is refused in one line instead of being killed by the
kernel (or by a CUDA out-of-memory error) in its first step.

Per process, for N parameters (N / world size under FSDP), tokens = micro_batch_size x seq_len:
- weights, gradients and AdamW's two moments, all fp32: 16 N bytes (autocast keeps fp32 weights);
  with A LoRA adapter parameters, the N weights are frozen: 4 N + 16 A bytes;
- activations kept for backward, per layer and token: (24 d_model + 4 d_ff) values for the
  blocks (SwiGLU keeps 4 d_ff-wide tensors; `d_ff` is the active width of an MoE layer), plus
  n_heads x seq_len attention probabilities where the attention is not a fused kernel (MLA on a
  CPU: its q/k and v head widths differ, so SDPA takes the math path); under activation
  checkpointing a layer keeps only its input (d_model) and one layer is recomputed at a time;
- the output layer: the [tokens, vocab] logits once in the compute dtype (model/loss.py), and off
  CUDA (where no Triton kernel works on them in place) one fp32 chunk of at most 2**27 values.
Values are 4 bytes under fp32 and 2 under bf16/fp16. The coefficients are fitted to the peak RSS of
training steps on a CPU in fp32 (NOTES.md, "Training": within 10% for MLA and MHA at 512-2048
tokens of context); on CUDA they are an estimate. A run is refused only when the estimate exceeds
what is available by `MARGIN`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from latentformer.config import ModelConfig
from latentformer.model.loss import CHUNK_VALUES

MARGIN = 1.2  # refuse above 120% of the available memory: "clearly will not fit"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process: `state` (weights, gradients, optimizer), `activations`, `logits`."""

    state: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.state + self.activations + self.logits


def training_bytes(model: ModelConfig, n_params: int, *, micro_batch_size: int, seq_len: int, dtype: str,
                   device_type: str, activation_checkpointing: bool = False, shards: int = 1,
                   adapters: int = 0) -> MemoryEstimate:
    """The memory one training process needs (see the module doc). `dtype` is the resolved
    training dtype (fp32 | bf16 | fp16); `shards` the FSDP world size (1 otherwise); `adapters` the
    LoRA parameters trained instead of the model's (0: all of the model's are trained)."""
    value = 4 if dtype == "fp32" else 2
    tokens = micro_batch_size * seq_len
    layers, d = model.n_layers, model.d_model
    if model.is_moe:
        moe_ff = (model.experts_per_token + model.n_shared_experts) * model.moe_d_ff
        widths = [model.d_ff] * model.first_k_dense_layers + [moe_ff] * (layers - model.first_k_dense_layers)
    else:
        widths = [model.d_ff] * layers
    scores = model.n_heads * seq_len if (model.attention == "mla" and device_type == "cpu") else 0
    per_layer = [24 * d + 4 * ff + scores for ff in widths]
    if activation_checkpointing:
        kept = layers * d + max(per_layer)
    else:
        kept = sum(per_layer)
    logits = tokens * model.vocab_size
    chunk = 0 if device_type == "cuda" else min(logits, CHUNK_VALUES) * 4
    state = 4 * n_params + 16 * adapters if adapters else 16 * -(-n_params // shards)
    return MemoryEstimate(state=state, activations=tokens * kept * value, logits=logits * value + chunk)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: CUDA's free memory, or the host's MemAvailable
    (Linux /proc/meminfo) shared by the processes of this host; None where unknown (MPS, no /proc)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return None


def check_fits(estimate: MemoryEstimate, available: int | None, device: torch.device, what: str) -> None:
    """ValueError (one line) when `estimate` exceeds `available` by more than MARGIN; `what` names the
    micro-batch, context and dtype the estimate is for."""
    if available is None or estimate.total <= MARGIN * available:
        return
    gb = 1e9
    raise ValueError(f"this run needs about {estimate.total / gb:.1f} GB per process ({estimate.state / gb:.1f} GB weights, "
                     f"gradients and AdamW state; {estimate.activations / gb:.1f} GB activations and {estimate.logits / gb:.1f} GB "
                     f"logits for {what}) but {device.type} has {available / gb:.1f} GB available: lower "
                     "--train.micro_batch_size (the batch stays --train.batch_tokens: more accumulation steps) or "
                     "--train.seq_len, set --train.activation_checkpointing true, or skip this check with "
                     "--train.memory_check false")
