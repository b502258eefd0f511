"""Checkpoint directories: every read, write and load check of a model or training checkpoint.

A model checkpoint is a directory holding `model.safetensors`, `config.json` (format
"latentformer", the model config) and the tokenizer files. A training step checkpoint adds
`train_state.pt` (and, for a LoRA run, `adapter.safetensors`: the adapters, whose merged weights
`model.safetensors` holds; train/lora.py): the optimizer, GradScaler, step, RNG states (python, numpy, torch, cuda), the
data iterator position, best validation loss, early-stopping counter and the run config. It is
written with `torch.save` and read with `weights_only=True`, so it holds only tensors and plain
containers (RNG states are converted). Weights are never pickled.

A run directory holds `checkpoints/step_<N>/` (the newest `keep_last`) and `checkpoints/best/`
(the weights of the lowest validation loss, no train state). Every checkpoint is one atomic
directory write (`fsutil.atomic_directory`); a save killed midway leaves hidden
`.<name>.tmp-*` / `.<name>.old-<pid>` directories, which `clean_leftovers` removes when the run
starts again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentformer.config import ModelConfig
from latentformer.fsutil import atomic_directory
from latentformer.model.transformer import Transformer

if TYPE_CHECKING:
    from latentformer.data.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "latentformer"
TRAIN_STATE = "train_state.pt"
ADAPTER = "adapter.safetensors"
# what `Trainer._restore` reads; a file lacking any of them was not written by the trainer
STATE_KEYS = ("step", "optimizer", "scaler", "rng", "data", "best_val", "bad_evals", "skipped_steps",
              "nonfinite_run", "train_seconds", "config")
# the names `atomic_directory` gives its temporary and moved-aside directories
LEFTOVER = re.compile(r"\.(?P<name>step_\d+|best)\.(?:tmp-.+|old-\d+)")


# -- model checkpoints -----------------------------------------------------------------------


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Persistent state without the tied output weight (safetensors refuses shared storage)."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_model(directory: Path, model: Transformer, tokenizer: Tokenizer | None = None, extra: dict | None = None) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_file(model_state(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    meta = {"format": FORMAT, "model": model.config.to_dict(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)


def save_checkpoint(path: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, extra: dict | None = None) -> Path:
    """Atomically write a model checkpoint directory at `path`."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model(tmp, model, tokenizer, extra)
    return path


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a latentformer checkpoint (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise ValueError(f"{path / CONFIG} is not a latentformer config (a Hugging Face checkpoint? use `latentformer convert --from hf`)")
    return ModelConfig.from_dict(meta["model"])


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
                optional: tuple[str, ...] = (), against: str = "its config") -> None:
    """ValueError naming `source` and the first tensor whose name or shape differs from `expected`
    (a model's `state_dict()`, meta tensors will do); names in `optional` may be absent from `state`."""
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not match {against}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, want in expected.items():  # the model's order: the first mismatch is the earliest layer's
        if name in state and state[name].shape != want.shape:
            raise ValueError(f"{source} does not match {against}: {name} has shape {list(state[name].shape)} in the "
                             f"checkpoint but {list(want.shape)} in the config (a checkpoint of another model shape?)")


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> Transformer:
    """The model of `cfg` holding the tensors of `state` (built on the meta device and assigned, so
    nothing is randomly initialized first); a tied output layer shares the embedding whether or not
    `state` has it. Raises ValueError naming `source` when the tensors do not match the config."""
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state(model.state_dict(), state, source, optional=_tied(cfg))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_derived_buffers()
    return model


def _tied(cfg: ModelConfig) -> tuple[str, ...]:
    """State names a checkpoint may lack: a tied output layer is the embedding."""
    return ("lm_head.weight",) if cfg.tie_embeddings else ()


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint directory's `model.safetensors` (what a LoRA run checks its frozen weights by)."""
    digest = hashlib.sha256()
    with (Path(path) / WEIGHTS).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The LoRA adapters of step checkpoint `path`; ValueError when the file is missing or unreadable."""
    file = path / ADAPTER
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} cannot be read (a LoRA run's step checkpoint holds its adapters): {e}") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory's `model.safetensors`, on the CPU; ValueError naming the
    file when it is missing, truncated or not safetensors."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise ValueError(f"{Path(path)} has no {WEIGHTS}")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is corrupt (truncated or not a safetensors file): {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build the model from `config.json` and load `model.safetensors` strictly.

    The file is read on the CPU and then moved, so a device this machine lacks is reported as
    such, never as a corrupt checkpoint."""
    path = Path(path)
    cfg = read_config(path)
    model = model_from_state(cfg, read_weights(path), str(path / WEIGHTS))
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:  # torch asserts when it was built without CUDA
        raise ValueError(f"device {device}: {e}".splitlines()[0]) from None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# -- run directories ---------------------------------------------------------------------------
def step_dirs(run_dir: str | Path) -> list[Path]:
    """A run's `checkpoints/step_<N>/` directories, oldest first; other names (`step_final`, a
    user's copy) are not step checkpoints and are ignored."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    steps = [p for p in ckpts.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(steps, key=lambda p: int(p.name[len("step_"):]))


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint directory itself, or in a run directory its `best` (default) or `latest` checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    if (path / CONFIG).is_file():
        return path
    ckpts = path / "checkpoints"
    steps = step_dirs(path)
    if which == "best" and (ckpts / "best" / CONFIG).is_file():
        return ckpts / "best"
    if steps:
        return steps[-1]
    raise ValueError(f"{path} holds no checkpoint (expected {CONFIG} or checkpoints/step_*/)")


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         which: str = "best", tokenizer: bool = True, check_finite: bool = False) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a checkpoint directory or a run directory (its best, else latest, checkpoint).

    tokenizer=False: (model, None), the tokenizer files not read, for a checkpoint that has none (a
    model converted without one, a model-only export) or a caller that feeds token ids itself.
    check_finite=True: ValueError naming the checkpoint when a weight holds NaN or inf (sampling
    from it would fail with an opaque error, and greedy decoding would print garbage)."""
    from latentformer.data.tokenizer import load_tokenizer

    ckpt = find_checkpoint(path, which)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ckpt, device=device, dtype=dtype)
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None) if check_finite else None
    if bad is not None:
        raise ValueError(f"{ckpt}: the checkpoint's weights are not finite (NaN or inf in {bad}, as loaded in "
                         f"{str(next(model.parameters()).dtype).removeprefix('torch.')}): the run diverged or the file is damaged")
    if not tokenizer:
        return model, None
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    return model, tokenizer


# -- training checkpoints -----------------------------------------------------------------------
def load_weights(model: Transformer, path: Path, flag: str, tokenizer: Tokenizer | None = None) -> None:
    """Load the weights of checkpoint `path` into `model` (a run's model, on its device), after checking
    that every tensor's name and shape matches the model's config and, when `tokenizer` is given, that
    the checkpoint's tokenizer is the same. Errors are ValueErrors that start with the CLI `flag`."""
    if tokenizer is not None:
        from latentformer.data.tokenizer import load_tokenizer

        if load_tokenizer(path).describe() != tokenizer.describe():
            raise ValueError(f"{flag} {path}: the data was prepared with another tokenizer than the checkpoint's "
                             f"(prepare it with --data.tokenizer {path})")
    weights = read_weights(path)
    check_state(model.state_dict(), weights, f"{flag}: {path / WEIGHTS}", optional=_tied(model.config),
                against="the run's model config")
    model.load_state_dict(weights, strict=False)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and cuda) RNG states as tensors and plain containers (`weights_only`-loadable)."""
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


def _save_without_crc(obj: Any, path: Path) -> None:
    """`torch.save` without the CRC-32 of each zip record: computing it was ~3 s of the 3.7 s that
    a 1 GB optimizer state took to write (development CPU); `torch.load` does not need it, and the
    step directory is written atomically, so a cut-off save never looks complete."""
    options = getattr(torch.serialization, "get_crc32_options", None)
    if options is None:  # torch < 2.6 has no switch
        torch.save(obj, path)
        return
    before = options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.set_crc32_options(before)


def save_step(run_dir: Path, step: int, model: Transformer, tokenizer: Tokenizer, train_state: dict[str, Any],
              keep_last: int, extra: dict[str, Any] | None = None, adapter: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `checkpoints/step_<step>/` atomically (with `adapter`, a LoRA run's adapters, as ADAPTER),
    then delete step checkpoints beyond the newest `keep_last`."""
    path = run_dir / "checkpoints" / f"step_{step}"
    with atomic_directory(path) as tmp:
        write_model(tmp, model, tokenizer, {"step": step, **(extra or {})})
        _save_without_crc(train_state, tmp / TRAIN_STATE)
        if adapter is not None:
            save_file(adapter, str(tmp / ADAPTER), metadata={"format": "pt"})
    for old in step_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_best(run_dir: Path, model: Transformer, tokenizer: Tokenizer, extra: dict[str, Any]) -> Path:
    """`checkpoints/best/`: the weights of the lowest validation loss (no train state)."""
    return save_checkpoint(run_dir / "checkpoints" / "best", model, tokenizer, extra)


def latest_step_dir(run_dir: Path) -> Path:
    """The newest `step_<N>/` of a run, which must hold a train state; ValueError when it does not."""
    steps = step_dirs(run_dir)
    if not steps or not (steps[-1] / TRAIN_STATE).is_file():
        raise ValueError(f"--resume: {run_dir} holds no step checkpoint with {TRAIN_STATE}")
    return steps[-1]


def load_train_state(path: Path) -> dict[str, Any]:
    """The train state of step checkpoint `path`; ValueError when it is unreadable or lacks a `STATE_KEYS` entry."""
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
