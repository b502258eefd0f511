"""Prompt prefill at shapes that change from call to call.

PyTorch's SDPA prefers cuDNN's attention on Hopper, and cuDNN builds an execution plan for every
new (batch, length) shape: about 100 ms on an H200 for a 125M model (up to ~900 ms for the first
shapes), against ~20 ms for the whole prefill of 16 x 1024 tokens once the plan exists. Training
runs one shape, so the plan is built once; a server meets a new shape with nearly every
arrival group. Prefill therefore runs on FlashAttention or the memory-efficient kernel, which
need no plan: every shape costs what a seen one does (benchmarks/RESULTS.md, "Serve").
"""

from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_attention():
    """Context manager: attention inside it never uses cuDNN (see the module docstring)."""
    return sdpa_kernel(PREFILL_BACKENDS)
