"""Triton kernels for CUDA; each module falls back to torch where its kernel does not apply."""

from __future__ import annotations

import torch


def gpu_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, shared memory bytes per multiprocessor) of a CUDA device; the launch
    heuristics size their programs with these (228 KB, Hopper's figure, where torch does not report it)."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
