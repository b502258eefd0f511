"""The serving batch when `--max-batch` is not given: sized to the device and the model.

Every decode step computes all `max_batch` rows of the preallocated cache, busy or not, and the
cache holds `max_batch` rows of the whole context. On a CPU a step's matmuls cost nearly in
proportion to the rows, so a wide batch mainly slows each request down (SmolLM2-135M at batch 16
on a 2-core CPU: a 16-token completion in 20-72 s, against 10-12 s at batch 1; issue 36); on a GPU
a step at batch 16 costs about what batch 1 does. Either way the cache must leave memory for the
rest: at most a quarter of the available system memory (CPU, MPS) or half of the GPU memory still
free once the weights are loaded.
"""

from __future__ import annotations

import os

PREFERRED = {"cpu": 4, "mps": 4, "cuda": 16}
SHARE = {"cpu": 0.25, "mps": 0.25, "cuda": 0.5}


def available_bytes(device) -> int:
    """Memory the cache may come from: free GPU memory (CUDA), else the system's available memory
    (Linux MemAvailable; elsewhere the free physical pages)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_batch(model, available: int | None = None) -> tuple[int, str]:
    """(rows, why) for `model` on its device; `available`: bytes the cache may come from (default:
    `available_bytes`)."""
    device = next(model.parameters()).device
    kind = device.type if device.type in PREFERRED else "cpu"
    preferred, share = PREFERRED[kind], SHARE[kind]
    available = available_bytes(device) if available is None else available
    row = model.kv_cache_bytes_per_token() * model.config.max_seq_len
    fit = int(available * share) // row
    where = "GPU" if kind == "cuda" else kind.upper()
    if fit >= preferred:
        return preferred, f"the {where} default; --max-batch to change"
    return max(1, fit), (f"{share:.0%} of the {available / 2**30:.1f} GiB {'free' if kind == 'cuda' else 'available'} holds "
                         f"{fit} row{'s' if fit != 1 else ''} of {model.config.max_seq_len} tokens; --max-batch to change")
