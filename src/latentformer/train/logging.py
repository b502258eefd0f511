"""Run logging on rank 0: a rich progress bar (or plain lines when stderr is not a terminal),
TensorBoard scalars (`RUN/tb/`) and `RUN/metrics.jsonl` (one JSON object per record: training
records have `step`, `loss`, `lr`, `tokens_per_s`, ...; evaluation records have `"eval": true`).

metrics.jsonl is strict JSON: a non-finite number is written as null and named, with its value,
in the record's `nonfinite` field (`"loss": null, "nonfinite": {"loss": "nan"}`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from latentformer.fsutil import atomic_write_text

# dense bf16 peak FLOP/s by device name (never the 2:4 sparsity figure)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
              "L4": 121e12, "4090": 165e12, "B200": 2250e12}


def peak_flops(device) -> float | None:
    """The GPU's dense bf16 peak, or None (CPU, MPS, unknown GPU: no MFU)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def truncate_metrics(path: Path, step: int) -> str | None:
    """On resume, drop records logged after the checkpoint's step (they will be logged again).

    A last line cut short (the process was killed while writing it) is dropped too, and said so in
    the returned note; any other line that is not a JSON record is a ValueError naming the file."""
    if not path.is_file():
        return None
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file: move it aside to resume") from None
    keep, note = [], None
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if i == len(lines) - 1:
                note = f"{path}: dropped a torn last line (line {i + 1})"
                break
            raise ValueError(f"{path} line {i + 1} is not a JSON record ({e}): fix or move the file aside to resume") from None
        if record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return note


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with non-finite floats (also inside lists) as None, named in `nonfinite`."""
    out, bad = {}, {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key], bad[key] = None, str(value)
        elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            out[key] = [v if not isinstance(v, float) or math.isfinite(v) else None for v in value]
            bad[key] = [str(v) for v in value if isinstance(v, float) and not math.isfinite(v)]
        else:
            out[key] = value
    if bad:
        out["nonfinite"] = bad
    return out


def eta_seconds(step_eta: float | None, budget_left: float | None) -> float | None:
    """The progress bar's ETA: the step-rate estimate, or the time budget left when that ends first."""
    if budget_left is None:
        return step_eta
    budget_left = max(budget_left, 0.0)
    return budget_left if step_eta is None else min(step_eta, budget_left)


def format_ppl(ppl: float) -> str:
    """Two decimals, or three significant digits for the astronomic perplexity of a diverged run."""
    return f"{ppl:.2f}" if ppl < 1e6 else f"{ppl:.3g}"


class EtaColumn(TimeRemainingColumn):
    """rich's step-rate ETA capped by the task's `budget_end` field (a time.monotonic() deadline,
    or None when the run has no time budget)."""

    def render(self, task) -> Text:
        end = task.fields.get("budget_end")
        eta = eta_seconds(task.time_remaining, None if end is None else end - time.monotonic())
        if eta is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(eta), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, tensorboard: bool = True, console: Console | None = None,
                 budget_seconds: float = 0.0) -> None:
        """`budget_seconds`: the run's time budget (0 = none), for the ETA."""
        self.enabled = enabled
        self.budget_seconds = budget_seconds
        self.console = console or Console(stderr=True)
        self._bar = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        note = truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress and self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 EtaColumn(), console=self.console, transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="", budget_end=None)
            self._bar.start()
        if note:
            self.message(note)

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        self._file.write(json.dumps(strict_record(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
                elif key == "moe_load":  # per-layer max/mean expert load
                    for i, imbalance in enumerate(value):
                        self._tb.add_scalar(f"moe/imbalance_layer{i}", imbalance, record["step"])

    def log_step(self, record: dict[str, Any], spent_seconds: float) -> None:
        """A training record (`step`, `loss`, `lr`, `tokens_per_s`, `elapsed_s` = training seconds, ...);
        `spent_seconds`: the time counted against the budget so far (for the ETA)."""
        if not self.enabled:
            return
        self._write(record, "train")
        kl = f"  kl {record['distill_loss']:.4f}" if "distill_loss" in record else ""
        info = f"loss {record['loss']:.4f}{kl}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        if record.get("mfu") is not None:
            info += f"  MFU {100 * record['mfu']:.1f}%"
        if self._bar is not None:
            self.advance(record["step"], spent_seconds, info=info)
        else:
            self.console.print(f"step {record['step']}  {info}", highlight=False, soft_wrap=True)

    def advance(self, step: int, spent_seconds: float, **fields: Any) -> None:
        if self._bar is not None:
            if self.budget_seconds:
                fields["budget_end"] = time.monotonic() + self.budget_seconds - spent_seconds
            self._bar.update(self._task, completed=step, **fields)

    def log_eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({**record, "eval": True}, "val")
        self.message(f"step {record['step']}  val loss {record['loss']:.4f}  ppl {format_ppl(record['perplexity'])}  "
                     f"bpb {record['bpb']:.4f}" + ("  (best)" if record.get("best") else ""))

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
