"""The training loop: one process, or one rank of a torchrun job.

Per optimizer step: fetch this rank's batch of micro_batch_size x grad_accum rows (windows of
prepared tokens, or padded conversations: data/conversations.py), run grad_accum forward/backward
micro-steps (DDP gradient sync / FSDP reduce-scatter only on the last), clip, check the loss and
gradient norm for non-finite values, step AdamW (or skip and count), zero the gradients, run the
MoE bias update. Evaluate, checkpoint and log on schedule.

The loss of a step is the mean over every counted target of the global batch: each micro-step's
mean is weighted by its share of the counted targets (rows of conversations count only their
assistant tokens; windows of tokens count all, and the weight is then exactly 1 / grad_accum).
With `train.lora_rank` > 0 the weights are frozen and LoRA adapters trained (train/lora.py); every
checkpoint still holds plain, merged weights, and the adapters travel beside them for resume.

Decisions that depend on time or signals (the time budget, time-based evals and checkpoints, a
SIGINT/SIGTERM) are taken from values every rank receives in the step's one reduction (rank 0's
clock), so all ranks stop, evaluate and save at the same step. A signal saves a checkpoint at
the next step boundary and raises `TrainingInterrupted`; a second one acts at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentformer import checkpoint as ckpt
from latentformer.data.dataset import trim_padding
from latentformer.fsutil import atomic_write_text, mark_output
from latentformer.model.transformer import IGNORE_INDEX, Transformer
from latentformer.train import distributed as D
from latentformer.train import fp8
from latentformer.train.config import RunConfig
from latentformer.train.evaluate import evaluate_batches
from latentformer.train.logging import RunLogger, peak_flops
from latentformer.train.memory import available_bytes, check_fits, training_bytes
from latentformer.train.optim import build_optimizer
from latentformer.train.schedule import lr_at, set_lr

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# a training loss this many times that of a uniform guess (ln vocab_size) is reported as divergence
DIVERGED = 3.0


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient, or a run that ends with
    non-finite weights or validation loss (nothing is saved from such a state)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during `fit`: a checkpoint was saved at the step boundary (`checkpoint`,
    None when the state was not finite and nothing was saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}")


def resolve_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ValueError("train.dtype=fp16 needs a GPU (use bf16 or fp32 on CPU)")
        return name
    return "bf16" if device.type == "cuda" else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_data(cfg: RunConfig):
    """The run's data source: conversations (`data.chat_file`, encoded with `data.tokenizer`, the
    checkpoint's) or prepared tokens; both give `tokenizer`, `train_batches`, `eval_batches`, `bytes_per_token`."""
    if cfg.data.chat_file:
        from latentformer.data.conversations import ChatData
        from latentformer.data.tokenizer import load_tokenizer

        return ChatData(cfg.data.chat_file, load_tokenizer(cfg.data.tokenizer), cfg.train.seq_len, cfg.data.chat_val_fraction)
    from latentformer.data.dataset import TokenData

    return TokenData(cfg.data.resolved_dir())


class Trainer:
    """`Trainer(cfg, run_dir, ...).fit()` -> summary dict. `on_step` callbacks run as
    `fn(trainer, step)` after every optimizer step (used by tests to interrupt a run)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, vocab_explicit: bool = False,
                 on_step: list[Callable[[Trainer, int], None]] | None = None,
                 init_from: str | Path | None = None) -> None:
        from latentformer.data.tokenizer import check_vocab_fits

        self.run_dir = Path(run_dir)
        self.on_step = list(on_step or [])
        self.env = env = D.init_distributed(cfg.train.device)
        t = cfg.train
        if env.device.type == "cpu":
            torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

        # data and vocabulary
        self.data = open_data(cfg)
        self.tokenizer = self.data.tokenizer
        if vocab_explicit:
            check_vocab_fits(self.tokenizer, cfg.model.vocab_size)
        elif cfg.model.vocab_size != self.tokenizer.vocab_size:
            cfg = RunConfig(cfg.model.replace(vocab_size=self.tokenizer.vocab_size), cfg.data, t)
        cfg.check()
        self.cfg = cfg
        # FSDP2 across processes: sharded weights and optimizer state (one process: a plain model)
        self.sharded = t.parallel == "fsdp" and env.distributed
        self.accum = t.grad_accum(env.world_size)
        self.dtype = resolve_dtype(t.dtype, env.device)
        if t.lora_rank and self.sharded:
            raise ValueError("train.lora_rank with train.parallel fsdp is not supported: use ddp (the adapters are "
                             "small; the frozen weights need no optimizer state)")

        if t.fp8:
            fp8.check_fp8(env.device)
        if t.memory_check:
            self._check_memory()
        # model, optimizer; state restored before wrapping so every rank starts identical
        seed_everything(t.seed)
        with torch.device(env.device):
            self.model = Transformer(cfg.model)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.dtype == "fp16" else None
        self.step = 0
        self.best_val = math.inf
        self.bad_evals = 0
        self.skipped_steps = 0
        self.nonfinite_run = 0
        self.train_seconds = 0.0  # step time (evals and saves excluded; tokens/s), rank 0's is saved
        # time in the loop's evaluations and checkpoint saves: the time budget counts it too
        self.eval_seconds = 0.0
        self.final_eval_seconds = 0.0  # the latest evaluation's duration: the final one's, expected
        # rank 0's budget time as of the previous step (train_seconds + eval_seconds + the expected
        # final evaluation, so that the run ends within its budget), received by every rank in the
        # step's reduction: the lr's time fraction and every time-based decision use it (module doc)
        self.clock = 0.0
        self.stop_signal: int | None = None  # set by the SIGINT/SIGTERM handler during fit
        self.stop_requested = False  # some rank got a signal (agreed in the step's reduction)
        self.save_due = False  # rank 0's checkpoint_minutes elapsed (agreed likewise)
        self.last_eval_finite = True  # the latest validation loss; a non-finite one blocks saving
        self.saved_config: dict[str, Any] | None = None  # the config the checkpoint was trained with
        self.notes: list[str] = []  # what __init__ did to the run, printed when fit starts
        self.log: RunLogger | None = None  # during fit
        self.last_save_wall = time.monotonic()
        # Every rank draws the same GLOBAL batch and keeps its own rows: the run is then the same
        # computation at any world size (DDP == one process with grad_accum, resume on other GPU
        # counts), at the cost of reading the global batch's window indices on each rank.
        self.rank_rows = t.micro_batch_size * self.accum
        self.train_iter = self.data.train_batches(self.rank_rows * env.world_size, t.seq_len, t.seed)
        self.step_tokens = 0  # positions the latest step ran through the model, all ranks (tokens/s)
        if resume and env.is_main:
            self.notes += ckpt.clean_leftovers(self.run_dir)
        D.barrier()
        self.resumed_from = ckpt.latest_step_dir(self.run_dir) if resume else None
        resumed = ckpt.load_train_state(self.resumed_from) if self.resumed_from is not None else None
        self.lora = self.lora_base = None
        if t.lora_rank:
            self._start_lora(resumed, init_from)
        elif resumed is not None:
            if resumed.get("lora_base"):
                raise ValueError("--resume: the run trained LoRA adapters (train.lora_rank was "
                                 f"{resumed['config']['train']['lora_rank']}); resume it with that rank")
            ckpt.load_weights(self.model, self.resumed_from, "--resume")
        elif init_from is not None:  # a new run from a checkpoint's weights: fresh optimizer, schedule, data order
            ckpt.load_weights(self.model, Path(init_from), "--init-from", tokenizer=self.tokenizer)
            self.notes.append(f"weights from {init_from}")

        self.teacher, self.teacher_hidden = self._load_teacher() if t.teacher else (None, None)
        self.distill_loss: float | None = None  # the latest step's KL to the teacher
        if t.fp8:  # before compile and wrapping, as torchao asks
            converted = fp8.convert_to_fp8(self.model, t.fp8_recipe, layers=t.fp8_layers, output=t.fp8_output)
            self.notes.append(f"fp8 ({t.fp8_recipe} scaling) in {len(converted)} linear layers ({t.fp8_layers}"
                              f"{', the output layer' if t.fp8_output else ''})")
        if t.low_precision_residual and self.dtype == "bf16":
            D.cast_residual_stream(self.model, torch.bfloat16)
        if t.activation_checkpointing:
            D.apply_activation_checkpointing(self.model)
        if t.compile:
            D.compile_model(self.model)
        self.wrapped = D.wrap_model(self.model, env, t.parallel)
        # after wrapping: fully_shard replaces the parameters by sharded DTensors
        self.optimizer = build_optimizer(self.model, t, env.device.type)
        if resumed is not None:
            self._restore(resumed)
        self.peak = peak_flops(env.device)
        self.flops_per_token = self.model.flops_per_token(t.seq_len)

    def _start_lora(self, resumed: dict[str, Any] | None, init_from: str | Path | None) -> None:
        """Load the frozen weights (the checkpoint the run started from, checked unchanged on resume),
        inject the adapters, and on resume load the saved ones."""
        from latentformer.train.lora import adapter_parameters, apply_lora, load_adapter_state, require_peft, target_modules

        require_peft()
        t = self.cfg.train
        if resumed is not None:
            self.lora_base = resumed.get("lora_base")
            if not self.lora_base:
                raise ValueError(f"--resume: the run trained every weight; train.lora_rank {t.lora_rank} cannot start "
                                 "mid-run (start a new run from its checkpoint)")
            base = Path(self.lora_base["path"])
            if not (base / ckpt.WEIGHTS).is_file() or ckpt.weights_sha256(base) != self.lora_base["sha256"]:
                raise ValueError(f"--resume: the LoRA run's frozen weights, {base / ckpt.WEIGHTS}, are missing or "
                                 "changed since the run started: it cannot resume exactly")
            ckpt.load_weights(self.model, base, "--resume")
        elif init_from is None:
            raise ValueError("train.lora_rank: LoRA adapts pretrained weights: start from a checkpoint "
                             "(latentformer finetune CKPT, or train --init-from CKPT)")
        else:
            base = Path(init_from).resolve()
            ckpt.load_weights(self.model, base, "--init-from", tokenizer=self.tokenizer)
            self.lora_base = {"path": str(base), "sha256": ckpt.weights_sha256(base)}
            self.notes.append(f"weights from {init_from}")
        adapters, targets = adapter_parameters(self.model, t), target_modules(self.model, t)
        self.lora = apply_lora(self.model, t)
        if resumed is not None:
            load_adapter_state(self.model, ckpt.read_adapter(self.resumed_from), str(self.resumed_from / ckpt.ADAPTER))
        self.notes.append(f"LoRA rank {t.lora_rank} (alpha {t.lora_alpha:g}) on {len(targets)} projections "
                          f"({', '.join(sorted({name.rsplit('.', 1)[-1] for name in targets}))}): {adapters:,} trainable parameters "
                          f"({100 * adapters / (self.model.num_params() - adapters):.2f}% of the model)")

    def _load_teacher(self) -> tuple[Transformer, Callable[[torch.Tensor], torch.Tensor]]:
        """train.teacher: the frozen model (on this process's device, in evaluation mode) and its
        `final_hidden` (compiled with train.compile), after checking that it reads the data's tokens."""
        from latentformer.data.tokenizer import load_tokenizer

        t = self.cfg.train
        if self.cfg.model.token_dropout > 0:
            raise ValueError("train.teacher: distillation needs the teacher to see the model's tokens: model.token_dropout must be 0")
        try:
            path = ckpt.find_checkpoint(t.teacher)
            tokenizer = load_tokenizer(path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"train.teacher: {e}") from None
        if tokenizer.describe() != self.tokenizer.describe():
            raise ValueError(f"train.teacher {path}: the teacher's tokenizer is not the data's: distillation compares "
                             "next-token distributions over one vocabulary")
        teacher = ckpt.load_model(path, device=self.env.device).requires_grad_(False)
        if teacher.config.vocab_size != self.cfg.model.vocab_size:
            raise ValueError(f"train.teacher {path}: its output layer has {teacher.config.vocab_size} rows, the model's "
                             f"{self.cfg.model.vocab_size}: distillation needs one vocabulary")
        self.notes.append(f"distilling from {path} ({teacher.num_params():,} parameters, {teacher.config.attention}), "
                          f"weight {t.distill_weight:g}")
        return teacher, torch.compile(teacher.final_hidden) if t.compile else teacher.final_hidden

    def _check_memory(self) -> None:
        """Refuse (ValueError) a run that clearly will not fit the device's available memory."""
        t, env = self.cfg.train, self.env
        with torch.device("meta"):
            meta = Transformer(self.cfg.model)
        if t.lora_rank:
            from latentformer.train.lora import adapter_parameters

            adapters = adapter_parameters(meta, t)
        else:
            adapters = 0
        estimate = training_bytes(self.cfg.model, meta.num_params(), micro_batch_size=t.micro_batch_size, seq_len=t.seq_len,
                                  dtype=self.dtype, device_type=env.device.type,
                                  activation_checkpointing=t.activation_checkpointing,
                                  shards=env.world_size if self.sharded else 1, adapters=adapters)
        check_fits(estimate, available_bytes(env.device), env.device,
                   f"micro_batch_size {t.micro_batch_size} x seq_len {t.seq_len} in {self.dtype}")

    # -- state -----------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=DTYPES[self.dtype])

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self._optimizer_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": ckpt.rng_state(),
            "data": self.train_iter.state_dict(),
            "best_val": self.best_val,
            "bad_evals": self.bad_evals,
            "skipped_steps": self.skipped_steps,
            "nonfinite_run": self.nonfinite_run,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "config": self.cfg.to_dict(),
            "lora_base": self.lora_base or {},  # the frozen weights' checkpoint and sha256 (LoRA runs)
        }

    def _optimizer_state(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer, scaler, data position, RNG and counters from a step's train state (the weights are
        loaded before wrapping)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.train_iter.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.best_val = state["best_val"]
        self.bad_evals = state["bad_evals"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_run = state["nonfinite_run"]
        self.train_seconds = state["train_seconds"]
        self.eval_seconds = state.get("eval_seconds", 0.0)  # absent from checkpoints of older versions
        self.clock = self.train_seconds + self.eval_seconds
        self.saved_config = state["config"]
        self._extend_past_budget()

    def _extend_past_budget(self) -> None:
        """A run that stopped on its time budget and is resumed with a new max_steps beyond its step
        (the budget unchanged) trains on to it without a budget: the extension the user asked for,
        recorded in the run's config.yaml. Raising max_time_minutes instead gives it a new budget."""
        t, saved = self.cfg.train, self.saved_config.get("train", {})
        spent = t.max_time_minutes and self.clock >= 60 * t.max_time_minutes
        new_steps = t.max_steps != saved.get("max_steps", t.max_steps) and t.max_steps > self.step
        if spent and new_steps and t.max_time_minutes == saved.get("max_time_minutes"):
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(t, max_time_minutes=0.0))
            self.notes.append(f"the run had stopped on its {t.max_time_minutes:g}-minute budget: it trains on to "
                              f"train.max_steps={t.max_steps} without one (train.max_time_minutes 0)")

    def _full_model(self) -> Transformer:
        """A Transformer with full (unsharded, CPU-gatherable; under LoRA merged) weights for writing checkpoints."""
        if self.lora is not None:
            from latentformer.train.lora import merged_state

            state = merged_state(self.model)
        elif not self.sharded:
            return self.model
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.device("meta"):
            shell = Transformer(self.cfg.model)
        shell.load_state_dict(state, strict=False, assign=True)
        return shell

    def _say(self, text: str) -> None:
        """A message from rank 0: through the run's logger during fit, else on stderr."""
        if self.log is not None:
            self.log.message(text)
        elif self.env.is_main:
            print(text, file=sys.stderr)

    def _unsaveable(self, model: Transformer) -> str | None:
        """Why the state must not be saved (rank 0, holding the full weights), or None."""
        if not self.last_eval_finite:
            return "the latest validation loss is not finite"
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return "the weights are not finite"
        return None

    def save(self) -> Path | None:
        """Step checkpoint (collective under FSDP; only rank 0 writes). Returns its path (None on
        ranks > 0), or None when the state is not finite: such a state is never saved, so the
        newest `keep_last` checkpoints stay the last good ones."""
        model = self._full_model()
        state = self.train_state()
        path = None
        if self.env.is_main:
            problem = self._unsaveable(model)
            if problem is None:
                adapter = None
                if self.lora is not None:
                    from latentformer.train.lora import adapter_state

                    adapter = adapter_state(self.model)
                path = ckpt.save_step(self.run_dir, self.step, model, self.tokenizer, state, self.cfg.train.keep_last,
                                      {"best_val_loss": self.best_val, "train_seq_len": self.cfg.train.seq_len}, adapter)
            else:
                last = ckpt.step_dirs(self.run_dir)
                self._say(f"step {self.step}: no checkpoint saved: {problem} "
                          f"(the newest saved one is {last[-1] if last else 'none'})")
        D.barrier()
        self.last_save_wall = time.monotonic()
        return path

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, split: str = "val", max_tokens: int | None = None) -> dict[str, float]:
        t = self.cfg.train
        return evaluate_batches(
            self.wrapped if self.sharded else self.model,
            self.data.eval_batches(split, t.eval_batch_size or t.micro_batch_size, t.seq_len),
            bytes_per_token=self.data.bytes_per_token(split), device=self.env.device, autocast=self._autocast,
            max_tokens=t.eval_tokens if max_tokens is None else max_tokens,
            rank=0 if self.sharded else self.env.rank, world_size=1 if self.sharded else self.env.world_size)

    # -- the loop ----------------------------------------------------------------------------
    def _micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool, divisor: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of the step's objective / `divisor` (the micro-batch's weight in the
        step's mean: grad_accum for windows of tokens); returns its mean loss and its mean KL to the
        teacher (None without one), each times grad_accum / divisor."""
        model = self.wrapped
        if self.sharded:
            model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        else:
            sync = model.no_sync() if (self.env.distributed and not last) else contextlib.nullcontext()
        with sync:
            with self._autocast():
                teacher = None
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher = (self.teacher_hidden(x), self.teacher.lm_head.weight)
                # distill_weight 1: the cross-entropy is logged, not trained on (no gradient to form)
                out = model(x, y, teacher=teacher, loss_grad=teacher is None or self.cfg.train.distill_weight < 1)
                loss = out.objective(self.cfg.train.mtp_weight, self.cfg.train.distill_weight)
            loss = loss / divisor
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        scale = self.accum / divisor
        return out.loss.detach() * scale, out.distill_loss.detach() * scale if out.distill_loss is not None else None

    def lr(self) -> float:
        t = self.cfg.train
        budget = 60 * t.max_time_minutes
        return lr_at(t, self.step, self.clock / budget if budget else 0.0)

    def _checkpoint_timer_due(self) -> bool:
        minutes = self.cfg.train.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.last_save_wall >= 60 * minutes

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step; returns (global mean loss, grad norm, finite). Also sets `distill_loss`
        (the global mean KL to train.teacher, None without one), `stop_requested`, `clock` and `save_due`
        from the step's reduction (see the module doc)."""
        t, env = self.cfg.train, self.env
        set_lr(self.optimizer, self.lr())
        x, y = next(self.train_iter)  # [micro_batch * accum * world, seq_len], the global batch
        counted = int((y != IGNORE_INDEX).sum())
        # every micro-batch of the global batch (ranks in order), without padding columns
        micro = [trim_padding(x[r : r + t.micro_batch_size], y[r : r + t.micro_batch_size])
                 for r in range(0, len(x), t.micro_batch_size)]
        self.step_tokens = sum(ya.numel() for _, ya in micro)
        loss_sum = torch.zeros(2, device=env.device)  # [cross-entropy, KL to the teacher (0 without one)]
        for a, (xa, ya) in enumerate(micro[env.rank * self.accum : (env.rank + 1) * self.accum]):
            # this micro-batch's share of the global mean: its mean loss x its counted targets x world / counted
            divisor = counted / (int((ya != IGNORE_INDEX).sum()) * env.world_size)
            loss, kl = self._micro_step(xa.to(env.device, non_blocking=True), ya.to(env.device, non_blocking=True),
                                        last=a == self.accum - 1, divisor=divisor)
            loss_sum[0] += loss
            if kl is not None:
                loss_sum[1] += kl
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        # summed over ranks: [loss, KL, any rank signalled, rank 0's clock, rank 0's checkpoint timer];
        # the grad norm (last) is already global
        main = float(env.is_main)
        agreed = torch.tensor([float(self.stop_signal is not None),
                               main * (self.train_seconds + self.eval_seconds + self.final_eval_seconds),
                               main * self._checkpoint_timer_due()], dtype=torch.float64, device=env.device)
        stats = torch.cat([(loss_sum / self.accum).double(), agreed, norm.double().reshape(1)])
        D.all_reduce_sum(stats[:5])
        loss, kl, stop, clock, save_due, norm_value = stats.tolist()  # the one host sync per step
        loss /= env.world_size
        self.distill_loss = kl / env.world_size if self.teacher is not None else None
        self.stop_requested, self.clock, self.save_due = stop > 0, clock, save_due > 0
        finite = math.isfinite(loss) and (math.isfinite(norm_value) or self.scaler is not None)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.model.update_router_bias()
        return loss, norm_value, finite

    def finished(self) -> str | None:
        """Why the run is over (max_steps, max_time, early_stopping), or None while it goes on."""
        t = self.cfg.train
        if self.step >= t.max_steps:
            return "max_steps"
        if t.max_time_minutes and self.clock >= 60 * t.max_time_minutes:
            return "max_time"
        if t.early_stopping_patience and self.bad_evals >= t.early_stopping_patience:
            return "early_stopping"
        return None

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGINT/SIGTERM set `stop_signal`, acted on at the next step boundary. The handler puts
        the previous one back, so a second signal acts at once (Ctrl-C: KeyboardInterrupt). Only the
        main thread may install handlers: a Trainer run in another thread keeps the process's own."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, previous[signum])
            if self.env.is_main:
                # stderr may be a pipe whose reader the same Ctrl-C ended (`2>&1 | tee log`): the
                # save must not depend on this line being written
                with contextlib.suppress(OSError):
                    os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                                "(send it again to stop at once)\n".encode())

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig) if signal.getsignal(sig) is not None else signal.SIG_DFL
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def config_changes(self) -> list[str]:
        """`section.field old -> new` for each field that differs from the checkpoint's config."""
        if self.saved_config is None:
            return []
        now = self.cfg.to_dict()
        return [f"{section}.{key} {old} -> {now[section][key]}"
                for section, fields in self.saved_config.items() if isinstance(fields, dict) and section in now
                for key, old in fields.items() if key in now[section] and now[section][key] != old]

    def _already_finished(self, reason: str) -> dict[str, Any]:
        """`fit` on a resumed run with nothing left to train: evaluate, change nothing."""
        val = {"step": self.step, **self.evaluate()}
        self._say(f"the run in {self.run_dir} already ended at step {self.step} ({reason}): nothing to train; "
                  "pass a larger --train.max_steps (or --train.max_time_minutes) with --resume to train on")
        return {"step": self.step, "stop_reason": reason, "val": val, "best_val_loss": self.best_val,
                "skipped_steps": self.skipped_steps, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "diverged": False}

    def fit(self) -> dict[str, Any]:
        """Train until max_steps, the time budget or early stopping; returns a summary dict.

        Raises NonFiniteError (too many non-finite steps in a row, or a non-finite end state, which
        is not saved) and TrainingInterrupted (SIGINT/SIGTERM, after saving at the step boundary)."""
        env = self.env
        if self.resumed_from is not None and (reason := self.finished()) is not None:
            return self._already_finished(reason)
        # a new run that ends in an error before saving anything leaves no run directory behind
        created = env.is_main and not self.run_dir.exists()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return self._fit()
        except BaseException:
            if created and not ckpt.step_dirs(self.run_dir) and not (self.run_dir / "checkpoints" / "best").is_dir():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _fit(self) -> dict[str, Any]:
        t, env = self.cfg.train, self.env
        # the logger first: it checks the run's metrics.jsonl before anything in the run is rewritten
        log = self.log = RunLogger(self.run_dir, enabled=env.is_main, total_steps=t.max_steps, start_step=self.step,
                                   progress=t.progress, tensorboard=t.tensorboard, budget_seconds=60 * t.max_time_minutes)
        if env.is_main:
            mark_output(self.run_dir, "run")
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        last_eval: dict[str, float] | None = None
        uniform = math.log(self.cfg.model.vocab_size)  # the loss of a uniform guess
        diverged = False
        self.model.train()
        try:
            for note in self.notes:
                log.message(note)
            if self.resumed_from is not None:
                log.message(f"resumed from {self.resumed_from} (step {self.step})")
                changes = self.config_changes()
                if changes:
                    log.message(f"config changed on resume, recorded in {self.run_dir / 'config.yaml'} for later "
                                f"resumes: {'; '.join(changes)}")
            batch = (f"{self.rank_rows * env.world_size} conversations of up to {t.seq_len} tokens" if self.cfg.data.chat_file
                     else f"{t.batch_tokens} tokens")
            log.message(f"model {self.model.num_params() / 1e6:.2f}M params ({self.cfg.model.attention}), "
                        f"{env.world_size} x {env.device.type} {self.dtype}, batch {batch} "
                        f"= {t.micro_batch_size} x {t.seq_len} x {self.accum} accum x {env.world_size} ranks")
            window_start, window_tokens = self.train_seconds, 0  # tokens/s over step time only (no evals)
            eval_every = 60 * t.max_time_minutes / t.budget_evals if t.max_time_minutes and t.budget_evals else 0.0
            next_eval = (math.floor(self.clock / eval_every) + 1) * eval_every if eval_every else math.inf
            self.last_save_wall = time.monotonic()
            with self._stop_signals():
                while (stop_reason := self.finished()) is None:
                    t0 = time.perf_counter()
                    loss, norm, finite = self.train_step()
                    self.step += 1
                    self.train_seconds += time.perf_counter() - t0
                    window_tokens += self.step_tokens
                    if not finite:
                        self.skipped_steps += 1
                        self.nonfinite_run += 1
                        log.message(f"step {self.step}: non-finite loss {loss} / grad norm {norm}: update skipped "
                                    f"({self.nonfinite_run} in a row, {self.skipped_steps} in all)")
                        if self.nonfinite_run >= t.max_nonfinite_steps:
                            raise NonFiniteError(f"training stopped: {self.nonfinite_run} consecutive non-finite steps at "
                                                 f"step {self.step} (lower train.lr, use bf16/fp32, or check the data)")
                    else:
                        self.nonfinite_run = 0
                        if loss > DIVERGED * uniform and not diverged:
                            diverged = True
                            log.message(f"step {self.step}: loss {loss:.4g} is {loss / uniform:.0f}x that of a uniform "
                                        f"guess (ln {self.cfg.model.vocab_size} = {uniform:.2f}): training is diverging "
                                        "(lower train.lr or raise train.warmup_steps)")
                    if self.step % t.log_interval == 0 or self.step == t.max_steps:
                        elapsed = self.train_seconds - window_start
                        record = self._step_record(loss, norm, window_tokens / max(elapsed, 1e-9))
                        log.log_step(record, self.clock)
                        window_start, window_tokens = self.train_seconds, 0
                    else:
                        log.advance(self.step, self.clock)
                    for fn in self.on_step:
                        fn(self, self.step)
                    if self.stop_requested:
                        raise TrainingInterrupted(self.stop_signal or signal.SIGTERM, self.step, self.save())
                    at_end = self.step >= t.max_steps
                    t1 = time.perf_counter()
                    if ((t.eval_interval and self.step % t.eval_interval == 0) or self.clock >= next_eval) and not at_end:
                        last_eval = self._eval_and_track(log)
                        self.final_eval_seconds = time.perf_counter() - t1
                        if eval_every:
                            next_eval = (math.floor(self.clock / eval_every) + 1) * eval_every
                    if ((t.checkpoint_interval and self.step % t.checkpoint_interval == 0) or self.save_due) and not at_end:
                        self.save()
                    self.eval_seconds += time.perf_counter() - t1
                t1 = time.perf_counter()
                if last_eval is None or last_eval["step"] != self.step:
                    last_eval = self._eval_and_track(log)
                saved = self.save()
                self.eval_seconds += time.perf_counter() - t1
            if stop_reason == "early_stopping":
                log.message(f"early stopping: no better val loss in {self.bad_evals} evaluations")
            if env.is_main and saved is None:
                last = ckpt.step_dirs(self.run_dir)
                raise NonFiniteError(f"training ended at step {self.step} with a non-finite state, which was not saved "
                                     f"(the newest checkpoint is {last[-1] if last else 'none'}; lower train.lr)")
            if math.isfinite(last_eval["loss"]) and last_eval["loss"] > uniform:
                diverged = True
                log.message(f"val loss {last_eval['loss']:.4g} is worse than a uniform guess ({uniform:.2f}): "
                            "the run diverged (lower train.lr)")
            if self.lora is not None:  # the trained model, as its checkpoints hold it
                from latentformer.train.lora import merge

                self.model, self.lora = merge(self.lora), None
        finally:
            log.close()
            self.log = None
        return {"step": self.step, "stop_reason": stop_reason, "val": last_eval, "best_val_loss": self.best_val,
                "skipped_steps": self.skipped_steps, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "diverged": diverged}

    def _step_record(self, loss: float, norm: float, tokens_per_s: float) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        record = {"step": self.step, "loss": loss, "lr": group["lr"] / group.get("lr_scale", 1.0), "grad_norm": norm,
                  "tokens_per_s": tokens_per_s, "skipped_steps": self.skipped_steps,
                  "elapsed_s": round(self.train_seconds, 3)}
        if self.distill_loss is not None:
            record["distill_loss"] = self.distill_loss  # KL(teacher || model); `loss` stays the cross-entropy
        if self.peak is not None:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.env.world_size)
        moe = self.model.moe_layers()
        if moe:
            record["moe_load"] = [float(m.load.max() / m.load.float().mean().clamp(min=1e-9)) for m in moe]
            record["moe_dropped"] = int(sum(int(m.dropped) for m in moe))
        return record

    def _save_best(self, result: dict[str, Any], log: RunLogger) -> None:
        """checkpoints/best/ from this evaluation (every rank takes part: FSDP gathers the weights)."""
        model = self._full_model()
        if self.env.is_main:
            problem = self._unsaveable(model)
            if problem is None:
                ckpt.save_best(self.run_dir, model, self.tokenizer,
                               {"step": self.step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                                "train_seq_len": self.cfg.train.seq_len})
            else:
                log.message(f"step {self.step}: best checkpoint not saved: {problem}")
        D.barrier()

    def _eval_and_track(self, log: RunLogger) -> dict[str, Any]:
        result = {"step": self.step, **self.evaluate()}
        self.last_eval_finite = math.isfinite(result["loss"])
        improved = self.last_eval_finite and result["loss"] < self.best_val
        if improved:
            self.best_val = result["loss"]
            self.bad_evals = 0
            if self.cfg.train.save_best:
                self._save_best(result, log)
        else:
            self.bad_evals += 1
        result["best"] = improved
        log.log_eval(result)
        if not self.last_eval_finite:
            log.message(f"step {self.step}: the validation loss is not finite: no checkpoint is saved until it is again")
        return result
