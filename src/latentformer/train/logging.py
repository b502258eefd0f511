"""Run logging on rank 0: a rich progress bar (or plain lines when stderr is not a terminal),
TensorBoard scalars (`RUN/tb/`) and `RUN/metrics.jsonl` (one JSON object per record: training
records have `step`, `loss`, `lr`, `tokens_per_s`, ...; evaluation records have `"eval": true`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


class RunLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, tensorboard: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._bar = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress and self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()
        self._t0 = time.time()

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])
                elif key == "moe_load":  # per-layer max/mean expert load
                    for i, imbalance in enumerate(value):
                        self._tb.add_scalar(f"moe/imbalance_layer{i}", imbalance, record["step"])

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(record, "train")
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        if record.get("mfu") is not None:
            info += f"  MFU {100 * record['mfu']:.1f}%"
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], info=info)
        else:
            self.console.print(f"step {record['step']}  {info}", highlight=False, soft_wrap=True)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def log_eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({**record, "eval": True}, "val")
        self.message(f"step {record['step']}  val loss {record['loss']:.4f}  ppl {record['perplexity']:.2f}  "
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
