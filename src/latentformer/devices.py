"""Host-to-device copies that do not stall a pipeline of queued device work."""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list or a CPU tensor) as a tensor on `device`; to a GPU through pinned memory,
    which does not wait for the work queued there (a copy from pageable memory does: in a decode
    loop, a sync every step)."""
    t = torch.as_tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
