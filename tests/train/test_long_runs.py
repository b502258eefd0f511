"""Long runs: checkpoints on a wall-time interval by default, evaluations spread over the time
budget whatever the machine's speed, and a progress-bar ETA that follows the budget."""

from __future__ import annotations

import io
import json
import re
import time

from rich.console import Console

from latentformer.checkpoint import step_dirs
from latentformer.train.config import TrainConfig
from latentformer.train.logging import RunLogger, eta_seconds
from latentformer.train.trainer import Trainer

from .conftest import run_config


def test_checkpoints_on_a_wall_time_interval_by_default(sotu_dir, tmp_path):
    default = TrainConfig()
    assert default.checkpoint_interval == 0 and 0 < default.checkpoint_minutes < default.max_time_minutes
    cfg = run_config(sotu_dir, threads=1, max_steps=30, keep_last=100, checkpoint_minutes=1e-4)  # 6 ms
    saved = []
    trainer = Trainer(cfg, tmp_path / "run")
    real = trainer.save
    trainer.save = lambda: saved.append(trainer.step) or real()
    trainer.fit()
    assert len(saved) >= 3 and saved[-1] == 30
    assert [p.name for p in step_dirs(tmp_path / "run")] == [f"step_{s}" for s in saved]


def test_evaluations_follow_the_time_budget_not_only_the_steps(sotu_dir, tmp_path):
    """eval_interval 0 (steps never trigger one): with budget_evals 4, a run that ends on its
    budget still evaluates at about 1/4, 2/4, 3/4 of it, and at the end."""
    cfg = run_config(sotu_dir, threads=1, max_steps=100000, max_time_minutes=0.02, eval_interval=0, eval_tokens=256)
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["stop_reason"] == "max_time"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if r.get("eval")]
    assert len(evals) >= 3 and evals == sorted(set(evals)) and evals[-1] == summary["step"]


def test_eta_is_the_time_budget_left_when_that_ends_first():
    assert eta_seconds(7200.0, 60.0) == 60.0  # the step rate says 2 h, the budget ends in a minute
    assert eta_seconds(30.0, 60.0) == 30.0
    assert eta_seconds(None, 45.0) == 45.0 and eta_seconds(50.0, None) == 50.0
    assert eta_seconds(10.0, -3.0) == 0.0


def rendered_eta(run_dir, budget_seconds: float) -> str:
    """The progress bar's ETA column after step 10 at 450 s of training."""
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    log = RunLogger(run_dir, enabled=True, total_steps=2000, start_step=0, tensorboard=False, console=console,
                    budget_seconds=budget_seconds)
    try:
        log.advance(10, spent_seconds=450.0)
        return str(log._bar.columns[-1].render(log._bar.tasks[0]))
    finally:
        log.close()


def test_eta_follows_the_time_budget_on_the_progress_bar(tmp_path):
    assert re.fullmatch(r"0:00:(29|30)", rendered_eta(tmp_path, 8 * 60.0))  # 30 s of an 8-minute budget left
    assert rendered_eta(tmp_path, 0.0) == "-:--:--"  # no budget, no step rate yet


def test_evaluation_time_counts_against_the_budget(sotu_dir, tmp_path):
    """A 2.4 s budget, an evaluation every 2 steps that takes 0.5 s: the loop, its evaluations, saves
    and the final evaluation included, ends within the budget (give or take a step and a save)."""
    cfg = run_config(sotu_dir, threads=1, max_steps=100000, max_time_minutes=0.04, eval_interval=2, eval_tokens=256,
                     budget_evals=0)
    trainer = Trainer(cfg, tmp_path / "run")
    real = trainer.evaluate
    trainer.evaluate = lambda *a, **k: time.sleep(0.5) or real(*a, **k)
    t0 = time.monotonic()
    summary = trainer.fit()
    wall = time.monotonic() - t0
    assert summary["stop_reason"] == "max_time" and summary["eval_seconds"] > 1.0
    assert 2.4 - 0.5 < wall < 2.4 + 1.0, wall
