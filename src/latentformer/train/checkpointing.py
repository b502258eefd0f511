"""Training checkpoints: `RUN/checkpoints/step_<N>/` = model checkpoint + `train_state.pt`.

`train_state.pt` holds the optimizer, GradScaler, step, RNG states (python, numpy, torch, cuda),
the data iterator position, best validation loss, early-stopping counter and the run config.
It is written with `torch.save` and read with `weights_only=True`, so it holds only tensors and
plain containers (RNG states are converted). Each checkpoint is one atomic directory write; the
last `keep_last` step checkpoints and `best/` are kept.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentformer.checkpoint import find_checkpoint, write_model
from latentformer.fsutil import atomic_directory

TRAIN_STATE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def save_step(run_dir: Path, step: int, model, tokenizer, train_state: dict[str, Any], keep_last: int,
              extra: dict[str, Any] | None = None) -> Path:
    """Write `step_<step>/` atomically, then delete step checkpoints beyond the newest `keep_last`."""
    path = step_dir(run_dir, step)
    with atomic_directory(path) as tmp:
        write_model(tmp, model, tokenizer, {"step": step, **(extra or {})})
        torch.save(train_state, tmp / TRAIN_STATE)
    steps = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(run_dir: Path, model, tokenizer, extra: dict[str, Any]) -> Path:
    """`checkpoints/best/`: the weights of the lowest validation loss (no optimizer state)."""
    path = run_dir / "checkpoints" / "best"
    with atomic_directory(path) as tmp:
        write_model(tmp, model, tokenizer, extra)
    return path


def latest_step_dir(run_dir: Path) -> Path:
    """The newest `step_<N>/` holding a train state; ValueError when there is none."""
    try:
        path = find_checkpoint(run_dir, which="latest")
    except (ValueError, FileNotFoundError):
        path = None
    if path is None or not (path / TRAIN_STATE).is_file():
        raise ValueError(f"--resume: {run_dir} holds no step checkpoint with {TRAIN_STATE}")
    return path


def load_train_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one clear line
        raise ValueError(f"{path / TRAIN_STATE} cannot be read: {e}".splitlines()[0]) from None
