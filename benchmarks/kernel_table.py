"""Where GPU time goes: profile one call and print its kernels by total time, grouped by kind."""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = [  # (kind, name fragments), first match wins
    ("attention", ("flash", "cudnn", "fmha", "attention", "sdpa", "_decode_kernel", "_merge_kernel")),
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton (fused elementwise/reductions)", ("triton",)),
]


def kernel_table(fn, title: str, top: int = 25) -> None:
    """Run `fn` once under the profiler and print its CUDA kernels: launches, total ms, by kind, top `top`."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:80]][0] += e.device_time_total / 1e3
            totals[e.name[:80]][1] += 1
    total = sum(t[0] for t in totals.values())
    kinds: collections.Counter = collections.Counter()
    for name, (ms, _) in totals.items():
        low = name.lower()
        kinds[next((k for k, frags in KINDS if any(f in low for f in frags)), "other")] += ms
    print(f"\n{title}: {sum(t[1] for t in totals.values())} kernels, {total:.3f} ms")
    for kind, ms in kinds.most_common():
        print(f"  {kind:40} {ms:8.3f} ms {ms / total:6.1%}")
    for name, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {name:80} {n:>5} {ms:8.3f} {ms / total:6.1%}")
