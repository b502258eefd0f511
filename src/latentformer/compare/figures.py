"""The comparison's figures, from results.json data, with matplotlib's Agg backend (no display),
each as PNG and SVG: validation loss vs training tokens, quality vs KV-cache bytes per token (the
Pareto plot), decode throughput vs context, largest batch vs context. One colour per variant
throughout; a figure with nothing to draw (no finished cell) is not written."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the report needs matplotlib: pip install 'latentformer[compare]' (or pass --no-report)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "latentformer"})
    return plt


def _colors(data: dict[str, Any]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {v["name"]: cmap(i % 10) for i, v in enumerate(data["variants"])}


def _save(plt, fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}.{ext}", format=ext, metadata={"Date": None} if ext == "svg" else None)
    plt.close(fig)
    return name


def _tokens_axis(axis) -> None:
    """Token counts as 500k / 1.2M."""
    from matplotlib.ticker import EngFormatter

    axis.set_major_formatter(EngFormatter(sep=""))


def _context_axis(axis, ticks: list[int]) -> None:
    """A log2 axis of contexts, ticked at `ticks`: 128, 512, 2k (k = 1024 tokens)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_major_locator(FixedLocator(sorted(set(ticks))))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos=None: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
    axis.set_minor_locator(NullLocator())


def _count_axis(axis) -> None:
    """A log axis of counts or rates ticked at 1-2-5 steps and labelled 200 / 1k / 20k (not 2 x 10^2)."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(EngFormatter(sep=""))
    axis.set_minor_formatter(NullFormatter())


def loss_curves(plt, data, colors, out: Path) -> str | None:
    variants = [v for v in data["variants"] if v["curve"]]
    if not variants:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        x = [p["tokens"] for p in v["curve"]]
        mean = [p["loss"]["mean"] for p in v["curve"]]
        std = [p["loss"]["std"] for p in v["curve"]]
        ax.plot(x, mean, marker="o", ms=3, color=colors[v["name"]], label=f"{v['name']} (n={v['cells_done']})")
        if any(std):
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors[v["name"]], alpha=0.15, lw=0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss during training (mean ± std over seeds)")
    _tokens_axis(ax.xaxis)
    # the first evaluations sit far above the rest: show the informative range
    finals = [p["loss"]["mean"] for v in variants for p in v["curve"][len(v["curve"]) // 4:]]
    lo, hi = min(finals), max(finals)
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.25 * (hi - lo + 1e-3))
    ax.legend()
    return _save(plt, fig, out, "loss_curves")


def pareto(plt, data, colors, out: Path) -> str | None:
    variants = [v for v in data["variants"] if v["bpb"] is not None]
    if not variants:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        x, y = v["kv_cache_bytes_per_token"], v["bpb"]
        ax.errorbar([x], [y["mean"]], yerr=[y["std"]] if y["n"] > 1 else None, fmt="o", ms=7, capsize=4,
                    color=colors[v["name"]], label=v["name"])
        ax.annotate(v["name"], (x, y["mean"]), textcoords="offset points", xytext=(7, 5), fontsize=9)
    # Pareto front: no other variant has both a smaller cache and a lower loss
    pts = sorted((v["kv_cache_bytes_per_token"], v["bpb"]["mean"]) for v in variants)
    front, best = [], float("inf")
    for x, y in pts:
        if y < best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--", color="0.5", lw=1, label="Pareto front")
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos=None: f"{x:,.0f} B"))
    ax.set_xlabel("KV-cache bytes per token (all layers, bf16; log scale)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title("Quality vs KV-cache size (lower left is better)")
    xs = [p[0] for p in pts]
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "pareto")


def decode(plt, data, colors, out: Path) -> str | None:
    batches = data["settings"]["decode_batch_sizes"]
    if not any(r["tokens_per_s"] for v in data["variants"] for r in v["decode"]):
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for v in data["variants"]:
            for mode in sorted({r["mode"] for r in v["decode"]}):
                points = sorted((r["context"], r["tokens_per_s"]["median"], r["tokens_per_s"]["flag"]) for r in v["decode"]
                                if r["mode"] == mode and r["batch_size"] == b and r["tokens_per_s"])
                if points:
                    label = v["name"] + (f" ({mode})" if mode != "standard" else "")
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, color=colors[v["name"]],
                            ls="--" if mode == "naive" else "-", label=label)
                    noisy = [p for p in points if p[2]]  # the report's "(noisy)": a spread too wide to read
                    if noisy:
                        ax.scatter([p[0] for p in noisy], [p[1] for p in noisy], marker="x", s=70, color="black", zorder=3,
                                   label="noisy (see report)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _context_axis(ax.xaxis, data["settings"]["decode_contexts"])
        _count_axis(ax.yaxis)
        ax.set_xlabel("context (cached tokens; log scale)")
        ax.set_ylabel("decode tokens/s (log scale)")
        ax.set_title(f"batch {b}")
    by_label = dict(zip(*reversed(axes[0][-1].get_legend_handles_labels())))  # label -> handle: "noisy" once
    axes[0][-1].legend(by_label.values(), by_label.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside: lines fill each panel
    devices = ", ".join(data["environment"]["decode_devices"])
    fig.suptitle(f"Decode throughput: one-token steps over a filled cache ({devices})", fontsize=10)
    return _save(plt, fig, out, "decode_throughput")


def max_batch(plt, data, colors, out: Path) -> str | None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in data["variants"]:
        rows = [(m["context"], m["batch_size"]) for m in v["max_batch"] if m["batch_size"] > 0]
        if rows:
            ax.plot(*zip(*rows), marker="o", ms=4, color=colors[v["name"]],
                    label=f"{v['name']} ({v['kv_cache_bytes_per_token']:,} B/token)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _context_axis(ax.xaxis, data["settings"]["max_batch_contexts"])
    _count_axis(ax.yaxis)
    ax.set_xlabel("context (tokens per sequence; log scale)")
    ax.set_ylabel("largest batch (sequences; log scale)")
    ax.set_title(f"Largest batch whose bf16 KV cache fits in {data['settings']['memory_gib']:g} GiB")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "max_batch")


def write_figures(out: Path, data: dict[str, Any]) -> list[str]:
    """Write the figures into `out`; returns their names (each exists as .png and .svg)."""
    plt = _plt()
    colors = _colors(data)
    names = [fn(plt, data, colors, out) for fn in (pareto, loss_curves, decode, max_batch)]
    return [n for n in names if n]
