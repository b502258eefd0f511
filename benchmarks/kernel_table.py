"""Where GPU time goes: profile one call and print its kernels by total time, grouped by kind."""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = [  # (kind, name fragments), first match wins
    ("attention", ("flash", "cudnn", "fmha", "attention", "sdpa", "_decode_kernel")),
    ("gemm", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton (fused elementwise/reductions)", ("triton",)),
]


def kernel_table(fn, title: str, top: int = 25, gaps: int = 0) -> None:
    """Run `fn` once under the profiler and print its CUDA kernels: launches, total ms, by kind, top `top`.
    `gaps` > 0 also records the CPU side and prints the GPU's idle time and its `gaps` longest idle
    intervals with the host operations running meanwhile (what the GPU waited for)."""
    activities = [ProfilerActivity.CUDA] + [ProfilerActivity.CPU] * (gaps > 0)
    with profile(activities=activities) as prof:
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
    if gaps:
        idle_table(prof, gaps)


def idle_table(prof, n: int, min_us: float = 20.0) -> None:
    """GPU idle intervals between consecutive kernels (>= min_us), longest first, each with the
    innermost host operations that span its middle."""
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    idle = []
    end = kernels[0][1]
    for start, stop in kernels[1:]:
        if start - end >= min_us:
            idle.append((start - end, end, start))
        end = max(end, stop)
    span = (end - kernels[0][0]) / 1e3
    total = sum(g for g, _, _ in idle) / 1e3
    print(f"  GPU idle: {total:.3f} ms of {span:.3f} ms from first to last kernel ({len(idle)} gaps >= {min_us:.0f} us)")
    for gap, start, stop in sorted(idle, reverse=True)[:n]:
        mid = (start + stop) / 2
        spanning = sorted((e for e in host if e.time_range.start <= mid <= e.time_range.end),
                          key=lambda e: e.time_range.end - e.time_range.start)
        names = " < ".join(e.name[:40] for e in spanning[:3]) or "(no host op: Python between calls)"
        print(f"  {gap / 1e3:8.3f} ms  {names}")
