"""Model checkpoints: a directory with `model.safetensors`, `config.json` and the tokenizer files.

Training runs add `train_state.pt` (optimizer, scheduler, RNG and data position; see
latentformer.train.checkpointing). Weights are never pickled; every write is atomic.

A run directory holds `checkpoints/step_<N>/` (the last K) and `checkpoints/best/`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

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
    check_state(model.state_dict(), state, source, optional=("lm_head.weight",) if cfg.tie_embeddings else ())
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_derived_buffers()
    return model


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
         which: str = "best") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a checkpoint directory or a run directory (its best, else latest, checkpoint)."""
    from latentformer.data.tokenizer import load_tokenizer

    ckpt = find_checkpoint(path, which)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ckpt, device=device, dtype=dtype)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    return model, tokenizer
