"""The training loop: one process, or one rank of a torchrun job.

Per optimizer step: fetch this rank's batch of micro_batch_size x grad_accum windows, run
grad_accum forward/backward micro-steps (DDP gradient sync / FSDP reduce-scatter only on the
last), clip, check the loss and gradient norm for non-finite values, step AdamW (or skip and
count), zero the gradients, run the MoE bias update. Evaluate, checkpoint and log on schedule.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from latentformer.checkpoint import WEIGHTS
from latentformer.fsutil import atomic_write_text
from latentformer.model.transformer import Transformer
from latentformer.train import checkpointing as ckpt
from latentformer.train import distributed as D
from latentformer.train.config import RunConfig
from latentformer.train.evaluate import evaluate
from latentformer.train.logging import RunLogger, peak_flops
from latentformer.train.optim import build_optimizer
from latentformer.train.schedule import lr_at, set_lr

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


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


class Trainer:
    """`Trainer(cfg, run_dir, ...).fit()` -> summary dict. `on_step` callbacks run as
    `fn(trainer, step)` after every optimizer step (used by tests to interrupt a run)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, vocab_explicit: bool = False,
                 on_step: list[Callable[[Trainer, int], None]] | None = None, console=None) -> None:
        from latentformer.data.dataset import RandomWindows, TokenData
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
        self.data = TokenData(cfg.data.resolved_dir())
        self.tokenizer = self.data.tokenizer
        if vocab_explicit:
            check_vocab_fits(self.tokenizer, cfg.model.vocab_size)
        elif cfg.model.vocab_size != self.tokenizer.vocab_size:
            cfg = RunConfig(cfg.model.replace(vocab_size=self.tokenizer.vocab_size), cfg.data, t)
        cfg.check()
        self.cfg = cfg
        self.accum = t.grad_accum(env.world_size)
        self.dtype = resolve_dtype(t.dtype, env.device)

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
        self.train_seconds = 0.0
        # Every rank draws the same GLOBAL batch and keeps its own rows: the run is then the same
        # computation at any world size (DDP == one process with grad_accum, resume on other GPU
        # counts), at the cost of reading the global batch's window indices on each rank.
        self.rank_rows = t.micro_batch_size * self.accum
        self.train_iter = RandomWindows(self.data.tokens("train"), batch_size=self.rank_rows * env.world_size,
                                        block_size=t.seq_len, seed=t.seed)
        self.resumed_from = ckpt.latest_step_dir(self.run_dir) if resume else None
        if self.resumed_from is not None:
            self._load_weights(self.resumed_from)

        if t.low_precision_residual and self.dtype == "bf16":
            D.cast_residual_stream(self.model, torch.bfloat16)
        if t.activation_checkpointing:
            D.apply_activation_checkpointing(self.model)
        if t.compile:
            D.compile_model(self.model)
        self.wrapped = D.wrap_model(self.model, env, t.parallel)
        # after wrapping: fully_shard replaces the parameters by sharded DTensors
        self.optimizer = build_optimizer(self.model, t, env.device.type)
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
        self.peak = peak_flops(env.device)
        self.flops_per_token = self.model.flops_per_token(t.seq_len)

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
            "config": self.cfg.to_dict(),
        }

    def _optimizer_state(self) -> dict[str, Any]:
        if self.cfg.train.parallel == "fsdp" and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_weights(self, path: Path) -> None:
        weights = load_file(str(path / WEIGHTS), device=str(self.env.device))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"--resume: {path} does not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def _restore(self, path: Path) -> None:
        """Optimizer, scaler, data position, RNG and counters (the weights are loaded before wrapping)."""
        state = ckpt.load_train_state(path)
        if self.cfg.train.parallel == "fsdp" and self.env.distributed:
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

    def _full_model(self) -> Transformer:
        """A Transformer with full (unsharded, CPU-gatherable) weights for writing checkpoints."""
        if not (self.cfg.train.parallel == "fsdp" and self.env.distributed):
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.device("meta"):
            shell = Transformer(self.cfg.model)
        shell.load_state_dict(state, strict=False, assign=True)
        return shell

    def save(self) -> None:
        """Step checkpoint (collective under FSDP; only rank 0 writes)."""
        model = self._full_model()
        state = self.train_state()
        if self.env.is_main:
            ckpt.save_step(self.run_dir, self.step, model, self.tokenizer, state, self.cfg.train.keep_last,
                           {"best_val_loss": self.best_val, "train_seq_len": self.cfg.train.seq_len})
        D.barrier()

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, split: str = "val", max_tokens: int | None = None) -> dict[str, float]:
        t = self.cfg.train
        fsdp = t.parallel == "fsdp" and self.env.distributed
        return evaluate(
            self.wrapped if fsdp else self.model, self.data.tokens(split),
            batch_size=t.eval_batch_size or t.micro_batch_size, seq_len=t.seq_len,
            bytes_per_token=self.data.bytes_per_token(split), device=self.env.device, autocast=self._autocast,
            max_tokens=t.eval_tokens if max_tokens is None else max_tokens,
            rank=0 if fsdp else self.env.rank, world_size=1 if fsdp else self.env.world_size)

    # -- the loop ----------------------------------------------------------------------------
    def _micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool) -> torch.Tensor:
        model = self.wrapped
        if self.env.distributed and self.cfg.train.parallel == "fsdp":
            model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        else:
            sync = model.no_sync() if (self.env.distributed and not last) else contextlib.nullcontext()
        with sync:
            with self._autocast():
                out = model(x, y, return_logits=False)
                loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
            loss = loss / self.accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return out.loss.detach()

    def lr(self) -> float:
        t = self.cfg.train
        budget = 60 * t.max_time_minutes
        return lr_at(t, self.step, self.train_seconds / budget if budget else 0.0)

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step; returns (global mean loss, grad norm, finite)."""
        t, env = self.cfg.train, self.env
        set_lr(self.optimizer, self.lr())
        x, y = next(self.train_iter)  # [micro_batch * accum * world, seq_len], the global batch
        mine = slice(env.rank * self.rank_rows, (env.rank + 1) * self.rank_rows)
        x = x[mine].to(env.device, non_blocking=True)
        y = y[mine].to(env.device, non_blocking=True)
        loss_sum = torch.zeros((), device=env.device)
        for a in range(self.accum):
            rows = slice(a * t.micro_batch_size, (a + 1) * t.micro_batch_size)
            loss_sum += self._micro_step(x[rows], y[rows], last=a == self.accum - 1)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        stats = torch.stack([loss_sum / self.accum, norm.float()]).float()
        D.all_reduce_sum(stats[:1])
        stats[0] /= env.world_size
        loss, norm_value = stats.tolist()  # the one host sync per step
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

    def fit(self) -> dict[str, Any]:
        t, env = self.cfg.train, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        log = RunLogger(self.run_dir, enabled=env.is_main, total_steps=t.max_steps, start_step=self.step,
                        progress=t.progress, tensorboard=t.tensorboard)
        tokens_per_step = t.batch_tokens
        stop_reason = "max_steps"
        last_eval: dict[str, float] | None = None
        self.model.train()
        try:
            if self.resumed_from is not None:
                log.message(f"resumed from {self.resumed_from} (step {self.step})")
            log.message(f"model {self.model.num_params() / 1e6:.2f}M params ({self.cfg.model.attention}), "
                        f"{env.world_size} x {env.device.type} {self.dtype}, batch {tokens_per_step} tokens "
                        f"= {t.micro_batch_size} x {t.seq_len} x {self.accum} accum x {env.world_size} ranks")
            window_start, window_steps = self.train_seconds, 0  # tokens/s over step time only (no evals)
            while self.step < t.max_steps:
                if t.max_time_minutes and self.train_seconds >= 60 * t.max_time_minutes:
                    stop_reason = "max_time"
                    break
                t0 = time.perf_counter()
                loss, norm, finite = self.train_step()
                self.step += 1
                self.train_seconds += time.perf_counter() - t0
                window_steps += 1
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
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    elapsed = self.train_seconds - window_start
                    record = self._step_record(loss, norm, window_steps * tokens_per_step / max(elapsed, 1e-9))
                    log.log_step(record)
                    window_start, window_steps = self.train_seconds, 0
                else:
                    log.advance(self.step)
                for fn in self.on_step:
                    fn(self, self.step)
                at_end = self.step == t.max_steps
                if (t.eval_interval and self.step % t.eval_interval == 0) and not at_end:
                    last_eval = self._eval_and_track(log)
                    if t.early_stopping_patience and self.bad_evals >= t.early_stopping_patience:
                        stop_reason = "early_stopping"
                        break
                if t.checkpoint_interval and self.step % t.checkpoint_interval == 0 and not at_end:
                    self.save()
            if last_eval is None or last_eval["step"] != self.step:
                last_eval = self._eval_and_track(log)
            self.save()
            if stop_reason == "early_stopping":
                log.message(f"early stopping: no better val loss in {self.bad_evals} evaluations")
        finally:
            log.close()
        return {"step": self.step, "stop_reason": stop_reason, "val": last_eval, "best_val_loss": self.best_val,
                "skipped_steps": self.skipped_steps, "train_seconds": self.train_seconds}

    def _step_record(self, loss: float, norm: float, tokens_per_s: float) -> dict[str, Any]:
        record = {"step": self.step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                  "tokens_per_s": tokens_per_s, "skipped_steps": self.skipped_steps,
                  "elapsed_s": round(self.train_seconds, 3)}
        if self.peak is not None:
            record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.env.world_size)
        moe = self.model.moe_layers()
        if moe:
            record["moe_load"] = [float(m.load.max() / m.load.float().mean().clamp(min=1e-9)) for m in moe]
            record["moe_dropped"] = int(sum(int(m.dropped) for m in moe))
        return record

    def _eval_and_track(self, log: RunLogger) -> dict[str, Any]:
        result = {"step": self.step, **self.evaluate()}
        improved = result["loss"] < self.best_val
        if improved:
            self.best_val = result["loss"]
            self.bad_evals = 0
            model = self._full_model()
            if self.env.is_main:
                ckpt.save_best(self.run_dir, model, self.tokenizer,
                               {"step": self.step, "val_loss": result["loss"], "val_bpb": result["bpb"],
                                "train_seq_len": self.cfg.train.seq_len})
            D.barrier()
        else:
            self.bad_evals += 1
        result["best"] = improved
        log.log_eval(result)
        return result
