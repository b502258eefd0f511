"""Training checkpoints: `RUN/checkpoints/step_<N>/` = model checkpoint + `train_state.pt`.

`train_state.pt` holds the optimizer, GradScaler, step, RNG states (python, numpy, torch, cuda),
the data iterator position, best validation loss, early-stopping counter and the run config.
It is written with `torch.save` and read with `weights_only=True`, so it holds only tensors and
plain containers (RNG states are converted). Each checkpoint is one atomic directory write; the
last `keep_last` step checkpoints and `best/` are kept. A save killed midway leaves hidden
`.<name>.tmp-*` / `.<name>.old-<pid>` directories (see `fsutil.atomic_directory`);
`clean_leftovers` removes them when the run starts again.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentformer.checkpoint import find_checkpoint, step_dirs, write_model
from latentformer.fsutil import atomic_directory

TRAIN_STATE = "train_state.pt"
# what `Trainer._restore` reads; a file lacking any of them was not written by this trainer
STATE_KEYS = ("step", "optimizer", "scaler", "rng", "data", "best_val", "bad_evals", "skipped_steps",
              "nonfinite_run", "train_seconds", "config")
# the names `atomic_directory` gives its temporary and moved-aside directories
LEFTOVER = re.compile(r"\.(?P<name>step_\d+|best)\.(?:tmp-.+|old-\d+)")


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
    for old in step_dirs(run_dir)[:-keep_last]:
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
    file = path / TRAIN_STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one clear line
        raise ValueError(f"{file} cannot be read: {e}".splitlines()[0]) from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ValueError(f"{file} is not a train state of this trainer (missing {', '.join(missing[:3])}): "
                         "resume from another checkpoint or start the run again")
    return state


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what killed saves left in `run_dir/checkpoints` (only `atomic_directory`'s hidden
    temporaries of step and best checkpoints); returns what was done, one line each. A save killed
    between its two renames leaves the previous checkpoint moved aside and none in place: that one
    is put back (the new one may be incomplete)."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    done = []
    for entry in sorted(ckpts.iterdir()):  # ".x.old-*" sorts before ".x.tmp-*"
        match = LEFTOVER.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        target = ckpts / match["name"]
        if ".old-" in entry.name and not target.exists():
            entry.rename(target)
            done.append(f"restored {target} from {entry.name}")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed {entry}")
    return done
