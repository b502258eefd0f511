"""Learning-rate schedules: pure functions of the optimizer step (no hidden state to checkpoint).

`lr_at(cfg, step)` is the learning rate used for update number `step` (0-based):
    warmup      linear from lr/warmup_steps up to lr over the first `warmup_steps` updates;
    cosine      then half a cosine from lr down to the floor `min_lr` at `max_steps`;
    step        then lr * gamma^(number of milestones <= step)  (the original Latentformer recipe);
    wsd         warmup-stable-decay (Hu et al. 2024, MiniCPM): lr until the last
                `decay_fraction` of the run, then linear down to `min_lr`;
    constant    then lr.
With a time budget (`train.max_time_minutes`) the decay's position is the larger of the step
fraction and elapsed/budget: the run anneals fully whichever limit comes first (such runs depend
on wall time, so they are not bit-reproducible; set max_time_minutes 0 for exact resume).
"""

from __future__ import annotations

import math

from latentformer.train.config import SCHEDULES, TrainConfig


def lr_at(cfg: TrainConfig, step: int, time_fraction: float = 0.0) -> float:
    """`time_fraction` (elapsed / train.max_time_minutes, when a time budget is set): the decay
    follows whichever of steps and time is further along, so a time-limited run still anneals.
    Warmup and the step schedule count optimizer steps only."""
    lr, floor, total = cfg.lr, cfg.min_lr, cfg.max_steps
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "step":
        return lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        progress = min(max((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), time_fraction), 1.0)
        return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        position = max(step / max(total, 1), time_fraction)
        decay_start = 1.0 - cfg.decay_fraction
        if position < decay_start:
            return lr
        return lr + (floor - lr) * min((position - decay_start) / cfg.decay_fraction, 1.0)
    raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def set_lr(optimizer, lr: float) -> None:
    """Every group's lr: `lr`, times the group's `lr_scale` where it has one (Muon's, train/optim.py)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
