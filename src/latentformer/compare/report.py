"""results.json (one schema: `results.schema.json` beside this file), report.md and a self-contained
report.html (tables + inline SVG figures) from the cells of a comparison directory.

Every statistic over seeds is {"mean", "std" (sample standard deviation; 0 for one seed), "n",
"values"}; a timing (training and decode tokens/s) is {"median", "mean", "std", "cv", "n", "values",
"flag"} over its repeats, shown as its median, and `flag` says why the spread makes it no result
(`noise_flag`); a statistic with no measurement (no finished cell, CPU MFU, a decode point that did
not fit) is null. Aggregation reads only cell.json and decode.json, so it runs anywhere (no data, no GPU).
"""

from __future__ import annotations

import collections
import html
import json
import platform
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from latentformer.compare.matrix import TOLERANCE
from latentformer.compare.measure import DECODE_ROUNDS, KV_DTYPE, MAX_BATCH_CONTEXTS, flops_per_token, kv_bytes_per_token, max_batch
from latentformer.compare.runner import Matrix, cell_dir, read_decode, read_state
from latentformer.fsutil import atomic_write_text

SCHEMA_VERSION = 6
RESULTS = "results.json"
# a timing whose repeats spread wider than this (coefficient of variation: std / mean), or that has
# fewer repeats than MIN_SAMPLES, is flagged: on shared cores one variant's figure can be 100x off
NOISY_CV = 0.10
MIN_SAMPLES = 3


def schema() -> dict[str, Any]:
    return json.loads((resources.files("latentformer.compare") / "results.schema.json").read_text(encoding="utf-8"))


def stat(values: list[float | None]) -> dict[str, Any] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals), "values": vals}


def noise_flag(values: list[float]) -> str | None:
    """Why a timing's repeats are no result (None: they are one)."""
    if len(values) < MIN_SAMPLES:
        return f"{len(values)} sample{'s' if len(values) != 1 else ''}, fewer than {MIN_SAMPLES}"
    cv = statistics.stdev(values) / statistics.fmean(values)
    return f"spread {100 * cv:.0f}% of the mean (CV) over {len(values)} samples, above {100 * NOISY_CV:.0f}%" if cv > NOISY_CV else None


def timing(values: list[float]) -> dict[str, Any] | None:
    """A timing's repeats: their median (the figure shown), spread and noise flag; None without any."""
    if not values:
        return None
    s = stat(values)
    return {"median": statistics.median(s["values"]), **s, "cv": s["std"] / s["mean"] if s["mean"] else 0.0,
            "flag": noise_flag(s["values"])}


def _windows(state: dict[str, Any]) -> list[float]:
    """A cell's training tokens/s per logged window (a cell finished before windows were kept: its median)."""
    train = state["train"]
    if "window_tokens_per_s" in train:
        return train["window_tokens_per_s"]
    return [train["tokens_per_s"]] if train["tokens_per_s"] is not None else []


def _curve(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_tokens: dict[int, list[dict[str, float]]] = {}
    for s in states:
        for point in s["curve"]:
            by_tokens.setdefault(point["tokens"], []).append(point)
    return [{"tokens": t, "loss": stat([p["loss"] for p in pts]), "bpb": stat([p["bpb"] for p in pts])}
            for t, pts in sorted(by_tokens.items())]


def _decode(decode: dict[str, Any] | None, variant: str, states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variant's decode rows from decode.json; for a variant it does not hold, the one timing per
    point that cells finished before decode.json kept in their cell.json (flagged: one sample)."""
    rows = [{**r, "tokens_per_s": r["tokens_per_s"] or []} for r in (decode["rows"] if decode else []) if r["variant"] == variant]
    if not rows:
        rows = [{**r, "tokens_per_s": [r["tokens_per_s"]] if r["tokens_per_s"] is not None else []}
                for r in next((s["decode"] for s in states if s.get("decode")), [])]
    return [{"mode": r["mode"], "batch_size": r["batch_size"], "context": r["context"], "tokens_per_s": timing(r["tokens_per_s"])}
            for r in rows]


def training_device(done: list[dict[str, Any]]) -> str | None:
    """The device whose cells give the training speeds (tokens/s, MFU, seconds): the one that trained
    the most finished cells, the earliest such cell's on a tie. Speeds of one GPU model are not
    comparable with another's, so a matrix finished on two kinds of GPU takes each variant's speed
    from this device's cells (from its own, flagged by `train_device`, when it has none there)."""
    counts = collections.Counter(s["device"] for s in done)  # most_common keeps first-seen order among ties
    return counts.most_common(1)[0][0] if counts else None


def _mean_curve(v: dict[str, Any]) -> list[tuple[int, float]]:
    """A variant's mean validation curve: (training tokens, mean loss over its seeds), in token order."""
    return [(p["tokens"], p["loss"]["mean"]) for p in v["curve"] if p["loss"] is not None]


def tokens_to_loss(curve: list[tuple[int, float]], loss: float) -> float | None:
    """Training tokens at which `curve` first reaches `loss` (linear between its points); None: never."""
    for i, (tokens, value) in enumerate(curve):
        if value <= loss:
            if i == 0:
                return float(tokens)
            t0, v0 = curve[i - 1]
            return t0 + (tokens - t0) * (v0 - loss) / (v0 - value)
    return None


def loss_at_tokens(curve: list[tuple[int, float]], tokens: float) -> float:
    """`curve`'s loss at `tokens` (linear between its points; its last loss past its end)."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            return v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return curve[-1][1] if tokens > curve[-1][0] else curve[0][1]


def reference_variant(variants: list[dict[str, Any]], family_reference: str) -> dict[str, Any] | None:
    """The variant the others are measured against: the family's reference when it is one of them,
    else the first; None when fewer than two variants have a validation curve."""
    measured = [v for v in variants if v["curve"] and v["val_loss"] is not None]
    if len(measured) < 2:
        return None
    return next((v for v in measured if v["name"] == family_reference), measured[0])


def against_reference(v: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """How `v` fares against `ref` (both `results` variants with curves), on mean curves over seeds:
    its final validation loss minus ref's; the training tokens where its curve reaches ref's final
    loss, and the ratio to ref's tokens; with both training speeds (median window tokens/s, so no
    compilation or evaluation time; timed on one GPU model), the ratio of the times to that loss, and
    v's loss after ref's training time (read off v's curve: mid-schedule when v is slower; its final
    loss when faster)."""
    mine, theirs = _mean_curve(v), _mean_curve(ref)
    target, ref_tokens = ref["val_loss"]["mean"], theirs[-1][0]
    reach = tokens_to_loss(mine, target)
    out = {"reference": ref["name"], "val_loss_delta": v["val_loss"]["mean"] - target, "tokens_to_reference_loss": reach,
           "tokens_ratio": reach / ref_tokens if reach is not None else None,
           "speed_ratio": None, "time_ratio": None, "tokens_at_reference_time": None, "val_loss_at_reference_time": None}
    if v["train_tokens_per_s"] and ref["train_tokens_per_s"] and v["train_device"] == ref["train_device"]:
        speed = v["train_tokens_per_s"]["median"] / ref["train_tokens_per_s"]["median"]
        tokens = min(ref_tokens * speed, mine[-1][0])  # v's tokens in ref's training time (it stops at its end)
        out.update(speed_ratio=speed, time_ratio=out["tokens_ratio"] / speed if reach is not None else None,
                   tokens_at_reference_time=tokens, val_loss_at_reference_time=loss_at_tokens(mine, tokens))
    return out


def results(root: Path, matrix: Matrix) -> dict[str, Any]:
    plan, family = matrix.plan, matrix.family
    states = {c.name: read_state(cell_dir(root, c)) for c in matrix.cells}
    done = {n: s for n, s in states.items() if s is not None and s.get("status") == "done"}
    decode = read_decode(root)
    first = matrix.cells[0].cfg.train if matrix.cells else None
    timing_device = training_device([done[c.name] for c in matrix.cells if c.name in done])
    variants = []
    for v in matrix.variants:
        mine = [c for c in matrix.cells if c.variant is v]
        ds = [done[c.name] for c in mine if c.name in done]
        timed = [s for s in ds if s["device"] == timing_device] or ds  # speeds compare within one device
        kv = kv_bytes_per_token(v.cfg.model)
        variants.append({
            "name": v.name, "preset": v.preset, "attention": v.cfg.model.attention, "model_overrides": v.model_overrides,
            "train_overrides": {k: str(x) for k, x in v.train_overrides.items()},
            "model": v.cfg.model.to_dict(), "params": v.params, "param_deviation": v.deviation, "matched_d_ff": v.matched_d_ff,
            "kv_cache_bytes_per_token": kv, "flops_per_token": flops_per_token(v.cfg.model, v.cfg.train.seq_len),
            "cells": [c.name for c in mine], "cells_done": len(ds),
            "val_loss": stat([s["val"]["loss"] for s in ds]), "perplexity": stat([s["val"]["perplexity"] for s in ds]),
            "bpb": stat([s["val"]["bpb"] for s in ds]),
            "best_val_loss": stat([min(p["loss"] for p in s["curve"]) for s in ds if s["curve"]]),
            "best_val_tokens": stat([min(s["curve"], key=lambda p: p["loss"])["tokens"] for s in ds if s["curve"]]),
            "train_device": timed[0]["device"] if timed else None,
            "train_tokens_per_s": timing([w for s in timed for w in _windows(s)]),
            "mfu": stat([s["train"]["mfu"] for s in timed]),
            "train_seconds": stat([s["train"]["seconds"] for s in timed]),
            "decode": _decode(decode, v.name, ds),
            "max_batch": [{"context": c, "batch_size": max_batch(kv, c, plan.memory_gib)} for c in MAX_BATCH_CONTEXTS],
            "curve": _curve(ds),
        })
    ref = reference_variant(variants, family.reference)
    for v in variants:
        v["vs_reference"] = against_reference(v, ref) if ref is not None and v is not ref and v["curve"] and v["val_loss"] else None
    cells = []
    for c in matrix.cells:
        s = states[c.name]
        status = "pending" if s is None else ("done" if s.get("status") == "done" else "trained")
        row = {"name": c.name, "variant": c.variant.name, "seed": c.cfg.train.seed, "status": status,
               "run_dir": str(Path("cells") / c.name)}
        if status == "done":
            row.update({k: s[k] for k in ("val", "train", "curve", "device", "finished")})
        cells.append(row)
    devices = sorted({s["device"] for s in done.values()} | ({decode["device"]} if decode else set()))
    # who timed the decode rows: decode.json's device, else the cells whose own rows are shown (`_decode`)
    decode_devices = [decode["device"]] if decode else sorted({s["device"] for s in done.values() if s.get("decode")})
    return {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": plan.command,
        "family": {"name": family.name, "description": family.description, "reference": family.reference,
                   "reference_params": matrix.reference_params},
        "data": {"dir": plan.data_dir, "fingerprint": plan.data_fingerprint, "vocab_size": plan.vocab_size},
        "settings": {
            "seeds": plan.seeds, "tokens_per_cell": first.max_steps * first.batch_tokens if first else 0,
            "steps_per_cell": first.max_steps if first else 0, "batch_tokens": first.batch_tokens if first else 0,
            "seq_len": first.seq_len if first else 0, "param_tolerance": TOLERANCE, "memory_gib": plan.memory_gib,
            "kv_dtype": str(KV_DTYPE).removeprefix("torch."), "decode_contexts": plan.decode_contexts,
            "decode_batch_sizes": plan.decode_batch_sizes, "max_batch_contexts": MAX_BATCH_CONTEXTS,
            "decode_rounds": decode["settings"]["rounds"] if decode else DECODE_ROUNDS,
            "noise": {"max_cv": NOISY_CV, "min_samples": MIN_SAMPLES},
            "overrides": {k: str(v) for k, v in plan.overrides.items()},
        },
        "environment": {"devices": devices, "decode_devices": decode_devices, "python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform()},
        "variants": variants,
        "cells": cells,
    }


def finished_cells(path: Path) -> int:
    """How many cells a results.json holds as done (0 when it is absent or unreadable: nothing to keep)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells")
        return sum(isinstance(c, dict) and c.get("status") == "done" for c in cells)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return 0


def write_results(root: Path, matrix: Matrix, force: bool = False) -> dict[str, Any]:
    """Write results.json from the cells; never over one with more finished cells unless `force`
    (a cell directory lost or moved would otherwise take its numbers with it)."""
    data = results(root, matrix)
    done, before = sum(c["status"] == "done" for c in data["cells"]), finished_cells(root / RESULTS)
    if done < before and not force:
        raise ValueError(f"{root / RESULTS} holds {before} finished cells, the cells in {root / 'cells'} only {done}: "
                         "not replaced (restore the missing cells, or pass --force to write it anyway)")
    atomic_write_text(root / RESULTS, json.dumps(data, indent=1) + "\n")
    return data


# -- tables ---------------------------------------------------------------------------------------
def _pm(s: dict[str, Any] | None, fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    if s is None:
        return "–"
    text = fmt.format(s["mean"] * scale)
    return text + (" ± " + fmt.format(s["std"] * scale) if s["n"] > 1 else "")


def _timed(t: dict[str, Any] | None, fmt: str = "{:,.0f}") -> str:
    """A timing's median, marked "(noisy)" when its flag says the spread makes it no result."""
    if t is None:
        return "–"
    return fmt.format(t["median"]) + (" (noisy)" if t["flag"] else "")


NOISE_NOTE = ("(noisy): the repeats spread more than {cv:.0f}% of their mean (coefficient of variation) or are fewer "
              "than {n}; the figure is not a result (results.json gives each repeat and the reason).")


def _best_decode(v: dict[str, Any]) -> tuple[str, str]:
    """The variant's decode tokens/s at the largest measured batch and context (its preferred mode)."""
    rows = [r for r in v["decode"] if r["mode"] in ("absorb", "standard") and r["tokens_per_s"] is not None]
    if not rows:
        return "–", ""
    r = max(rows, key=lambda r: (r["batch_size"], r["context"]))
    return _timed(r["tokens_per_s"]), f"B{r['batch_size']} × {r['context']:,}"


def _best_val(v: dict[str, Any]) -> str:
    """The lowest logged validation loss and where it was reached (an overfitting run's better weights)."""
    if v["best_val_loss"] is None:
        return "–"
    return f"{_pm(v['best_val_loss'])} ({v['best_val_tokens']['mean'] / 1e6:.1f}M)"


def summary_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    ctx = 8192 if 8192 in data["settings"]["max_batch_contexts"] else data["settings"]["max_batch_contexts"][-1]
    point = next((_best_decode(v)[1] for v in data["variants"] if _best_decode(v)[1]), "")
    head = ["variant", "attention", "params (vs ref)", "KV bytes/token", "val loss", "perplexity", "bits/byte",
            "best val loss (at tokens)", "train tokens/s", "MFU", f"decode tokens/s ({point})" if point else "decode tokens/s",
            f"max batch @ {ctx:,} ({data['settings']['memory_gib']:g} GiB)"]
    rows = []
    for v in data["variants"]:
        mb = next(m["batch_size"] for m in v["max_batch"] if m["context"] == ctx)
        rows.append([v["name"], v["attention"], f"{v['params'] / 1e6:.2f}M ({100 * v['param_deviation']:+.1f}%)",
                     f"{v['kv_cache_bytes_per_token']:,}", _pm(v["val_loss"]), _pm(v["perplexity"], "{:.2f}"), _pm(v["bpb"]),
                     _best_val(v),
                     _timed(v["train_tokens_per_s"]), _pm(v["mfu"], "{:.1f}%", 100), _best_decode(v)[0], f"{mb:,}"])
    if any(v["train_overrides"] for v in data["variants"]):  # variants trained differently: say how, beside the name
        head.insert(1, "training")
        for row, v in zip(rows, data["variants"]):
            row.insert(1, ", ".join(f"{k}={x}" for k, x in v["train_overrides"].items()) or "common recipe")
    return head, rows


def reference_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per variant measured against the reference (`vs_reference`)."""
    ref = next(v["vs_reference"]["reference"] for v in data["variants"] if v["vs_reference"])
    head = ["variant", "training", f"val loss vs {ref}", f"tokens to {ref}'s final loss", "train tokens/s",
            f"time to {ref}'s final loss", f"val loss after {ref}'s training time"]
    rows = []
    ratio = lambda x: "–" if x is None else f"{x:.2f}x"  # noqa: E731
    for v in data["variants"]:
        r = v["vs_reference"]
        if r is None:
            continue
        rows.append([v["name"], ", ".join(f"{k}={x}" for k, x in v["train_overrides"].items()) or "common recipe",
                     f"{r['val_loss_delta']:+.4f} ({100 * r['val_loss_delta'] / (v['val_loss']['mean'] - r['val_loss_delta']):+.1f}%)",
                     "not reached" if r["tokens_to_reference_loss"] is None
                     else f"{r['tokens_to_reference_loss'] / 1e6:.1f}M ({ratio(r['tokens_ratio'])})",
                     ratio(r["speed_ratio"]), "not reached" if r["tokens_to_reference_loss"] is None else ratio(r["time_ratio"]),
                     "–" if r["val_loss_at_reference_time"] is None
                     else f"{r['val_loss_at_reference_time']:.4f} (at {r['tokens_at_reference_time'] / 1e6:.1f}M)"])
    return head, rows


def decode_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    points = [(b, c) for b in data["settings"]["decode_batch_sizes"] for c in data["settings"]["decode_contexts"]]
    head = ["variant", "mode"] + [f"B{b} × {c:,}" for b, c in points]
    rows = []
    for v in data["variants"]:
        by = {(r["mode"], r["batch_size"], r["context"]): r["tokens_per_s"] for r in v["decode"]}
        for mode in sorted({r["mode"] for r in v["decode"]}):
            rows.append([v["name"], mode] + [_timed(by.get((mode, b, c))) for b, c in points])
    return head, rows


def max_batch_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    ctxs = data["settings"]["max_batch_contexts"]
    head = ["variant", "KV bytes/token"] + [f"{c // 1024}k" for c in ctxs]
    rows = [[v["name"], f"{v['kv_cache_bytes_per_token']:,}"] + [f"{m['batch_size']:,}" for m in v["max_batch"]]
            for v in data["variants"]]
    return head, rows


def cells_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["cell", "variant", "seed", "status", "val loss", "bits/byte", "train s", "tokens/s", "device", "run directory"]
    rows = []
    for c in data["cells"]:
        done = c["status"] == "done"
        rows.append([c["name"], c["variant"], str(c["seed"]), c["status"],
                     f"{c['val']['loss']:.4f}" if done else "–", f"{c['val']['bpb']:.4f}" if done else "–",
                     f"{c['train']['seconds']:.0f}" if done else "–",
                     f"{c['train']['tokens_per_s']:,.0f}" if done and c["train"]["tokens_per_s"] else "–",
                     c.get("device", "–"), c["run_dir"]])
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _speed_device(data: dict[str, Any]) -> str:
    """Where the training speeds come from, when the cells ran on more than one kind of device."""
    if len({c["device"] for c in data["cells"] if c["status"] == "done"}) < 2:
        return ""
    devices = collections.Counter(v["train_device"] for v in data["variants"] if v["train_device"])
    main = devices.most_common(1)[0][0]
    others = [f"{v['name']}: {v['train_device']}" for v in data["variants"] if v["train_device"] not in (None, main)]
    return (f", from the cells trained on {main} only (speeds are comparable within one device)"
            + (f"; variants with no cell there, from their own device ({'; '.join(others)})" if others else ""))


def _finished(data: dict[str, Any]) -> str:
    done = sum(c["status"] == "done" for c in data["cells"])
    return f"{done} of {len(data['cells'])} cells finished"


def _sections(data: dict[str, Any]) -> list[tuple[str, str, tuple]]:
    """(title, explanation, table) in report order."""
    s = data["settings"]
    noise = NOISE_NOTE.format(cv=100 * s["noise"]["max_cv"], n=s["noise"]["min_samples"])
    return [
        ("Summary", f"Mean ± sample standard deviation over the finished seeds ({_finished(data)}). Quality of the final "
                    "weights over the whole validation split; best val loss: the lowest periodic validation loss and the "
                    "training tokens where it was reached; KV bytes per token over all layers in bf16; training tokens/s is the "
                    f"median of every logged window of the variant's cells (seeds alternate variants){_speed_device(data)}; "
                    f"decode tokens/s at the largest measured batch and context (MLA absorbed). {noise}", summary_table(data)),
        *([("Against the reference", "Each variant against the reference on its mean validation curve over seeds "
                 "(linear between the periodic evaluations): its final loss minus the reference's; the training tokens where it "
                 "reaches the reference's final loss (x the reference's tokens); its training tokens/s and time to that loss "
                 "(x the reference's, from the median window speeds: no compilation or evaluation); its loss after as much "
                 "training time as the reference had, read off its curve. A point inside a run is mid-schedule (the learning "
                 "rate not yet decayed): a run planned for that length ends lower.", reference_table(data))]
          if any(v["vs_reference"] for v in data["variants"]) else []),
        ("Decode throughput", "Decode tokens/s (batch / median one-token step time) over a cache filled to the context, "
                              f"the median of {s['decode_rounds']} rounds that each time every variant once, interleaved; "
                              f"timed on {', '.join(data['environment']['decode_devices']) or 'no device yet'}. "
                              f"MLA: absorbed and naive decoding. {noise}", decode_table(data)),
        ("Largest batch", f"Largest batch whose bf16 KV cache alone fits in {s['memory_gib']:g} GiB at each context "
                          "(weights and activations not counted).", max_batch_table(data)),
        ("Cells", "Every cell is an ordinary run directory: `latentformer eval/generate/info` work on it.", cells_table(data)),
    ]


def _intro(data: dict[str, Any]) -> list[str]:
    s, f = data["settings"], data["family"]
    per_device = collections.Counter(c["device"] for c in data["cells"] if c["status"] == "done")
    devices = (", ".join(f"{d} ({n} cells)" for d, n in per_device.most_common()) if len(per_device) > 1
               else ", ".join(data["environment"]["devices"]) or "none yet")
    return [f"Family **{f['name']}**: {f['description']}. Parameters matched to `{f['reference']}` "
            f"({f['reference_params']:,}) within {100 * s['param_tolerance']:.0f}%.",
            f"{s['tokens_per_cell']:,} training tokens per cell ({s['steps_per_cell']} steps × {s['batch_tokens']:,} tokens, "
            f"context {s['seq_len']}), {s['seeds']} seed(s) per variant, {_finished(data)}; data `{data['data']['dir']}` "
            f"(vocabulary {data['data']['vocab_size']:,}). Device: {devices}.",
            f"Command: `{data['command']}`" if data["command"] else ""]


def write_markdown(root: Path, data: dict[str, Any], figures: list[str]) -> None:
    parts = [f"# Attention-variant comparison: {data['family']['name']}", ""] + [p for p in _intro(data) if p] + [""]
    for title, text, table in _sections(data)[:1]:
        parts += [f"## {title}", "", text, "", _md_table(*table), ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{name}](figures/{name}.png)" for name in figures] + [""]
    for title, text, table in _sections(data)[1:]:
        parts += [f"## {title}", "", text, "", _md_table(*table), ""]
    parts += [f"Generated {data['created']} from `results.json` (schema version {data['schema_version']})."]
    atomic_write_text(root / "report.md", "\n".join(parts) + "\n")


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}svg{max-width:100%;height:auto}
code{background:#f3f3f3;padding:1px 4px}"""


def write_html(root: Path, data: dict[str, Any], figures: list[str]) -> None:
    def para(text: str) -> str:
        text = html.escape(text)
        for mark, tag in (("**", "b"), ("`", "code")):
            while text.count(mark) >= 2:
                text = text.replace(mark, f"<{tag}>", 1).replace(mark, f"</{tag}>", 1)
        return f"<p>{text}</p>"

    body = [f"<h1>Attention-variant comparison: {html.escape(data['family']['name'])}</h1>"]
    body += [para(p) for p in _intro(data) if p]
    sections = _sections(data)
    title, text, table = sections[0]
    body += [f"<h2>{title}</h2>", para(text), _html_table(*table)]
    if figures:
        body.append("<h2>Figures</h2>")
        for name in figures:
            svg = (root / "figures" / f"{name}.svg").read_text(encoding="utf-8")
            body.append(f"<figure>{svg[svg.index('<svg'):]}</figure>")  # inline: no file beside the page needed
    for title, text, table in sections[1:]:
        body += [f"<h2>{title}</h2>", para(text), _html_table(*table)]
    body.append(para(f"Generated {data['created']} from results.json (schema version {data['schema_version']})."))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>compare: {html.escape(data['family']['name'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(root / "report.html", page)


def write_report(root: Path, data: dict[str, Any]) -> list[str]:
    """Figures (PNG + SVG), report.md and report.html; returns the written paths, relative to root."""
    from latentformer.compare.figures import write_figures

    figures = write_figures(root / "figures", data)
    write_markdown(root, data, figures)
    write_html(root, data, figures)
    return ["report.md", "report.html"] + [f"figures/{n}.{ext}" for n in figures for ext in ("png", "svg")]
