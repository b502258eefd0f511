"""Faults during `latentformer train` in a subprocess: SIGKILL at random times (resumed each time),
SIGINT and SIGTERM (a checkpoint at the step boundary, a one-line exit, resumed), each ending
bit-identical to the uninterrupted run; and what killed saves leave behind."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentformer.checkpoint import clean_leftovers, step_dirs

from .conftest import TINY_MODEL_ARGS

STEPS = 40
# step-exact (no time budget); a checkpoint every step, so kills land in saves too; dropout draws
# from the RNG, so the resumed RNG state matters
FLAGS = [*TINY_MODEL_ARGS, "--model.dropout", "0.1", "--train.device", "cpu", "--train.threads", "1",
         "--train.seq_len", "32", "--train.micro_batch_size", "8", "--train.batch_tokens", "256",
         "--train.warmup_steps", "2", "--train.max_steps", str(STEPS), "--train.max_time_minutes", "0",
         "--train.checkpoint_interval", "1", "--train.eval_interval", "10", "--train.eval_tokens", "2048",
         "--train.eval_batch_size", "64", "--train.log_interval", "5", "--train.progress", "false",
         "--train.tensorboard", "false", "--no-sample"]


def start(data: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTFORMER_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "latentformer", "train", "--data", str(data), "--out", str(run),
                             *FLAGS, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def latest(run: Path) -> int:
    steps = step_dirs(run)
    return int(steps[-1].name[len("step_"):]) if steps else 0


def wait_for_progress(proc: subprocess.Popen, run: Path, beyond: int, timeout: float = 60) -> bool:
    """Until a step checkpoint newer than `beyond` exists (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest(run) > beyond:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"no progress in {timeout} s")


def final_state(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = run / "checkpoints" / f"step_{STEPS}"
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    return load_file(str(ckpt / "model.safetensors")), state


def curve(run: Path) -> list[tuple]:
    """(step, eval?, loss) of every metrics record: the run's history, timing fields aside."""
    return [(r["step"], bool(r.get("eval")), r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_same_run(got: Path, want: Path) -> None:
    (gw, gs), (ww, ws) = final_state(got), final_state(want)
    assert gw.keys() == ww.keys()
    assert [k for k in ww if not torch.equal(gw[k], ww[k])] == []
    for i, slot in ws["optimizer"]["state"].items():
        assert torch.equal(gs["optimizer"]["state"][i]["exp_avg_sq"], slot["exp_avg_sq"])
    assert gs["data"] == ws["data"] and gs["step"] == ws["step"] == STEPS
    assert curve(got) == curve(want)
    assert not [p.name for p in (got / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.fixture(scope="module")
def reference(sotu_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    code, err = finish(start(sotu_dir, run))
    assert code == 0, err
    return run


def test_random_sigkills_then_resume_are_bit_identical(sotu_dir, tmp_path, reference):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    run = tmp_path / "run"
    proc, kills, done_step = start(sotu_dir, run), [], 0
    while len(kills) < 3 and wait_for_progress(proc, run, done_step):
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        done_step = latest(run)
        kills.append(done_step)
        proc = start(sotu_dir, run, "--resume")
    code, err = finish(proc)
    assert code == 0, f"seed {seed}, kills after steps {kills}: {err}"
    assert kills, f"seed {seed}: the run ended before any kill"
    assert_same_run(run, reference)


def test_sigint_then_sigterm_save_resumable_checkpoints(sotu_dir, tmp_path, reference):
    run = tmp_path / "run"
    proc, step = start(sotu_dir, run), 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert wait_for_progress(proc, run, step), "the run ended before the signal"
        proc.send_signal(sig)
        code, err = finish(proc)
        last = err.strip().splitlines()[-1]
        assert code == 128 + sig, err
        match = re.fullmatch(rf"latentformer train: stopped by {sig.name} at step (\d+): checkpoint (\S+); "
                             rf"resume with: latentformer train --out {re.escape(str(run))} --resume", last)
        assert match, last
        step = int(match[1])
        assert step < STEPS and Path(match[2]) == run / "checkpoints" / f"step_{step}" and latest(run) == step
        proc = start(sotu_dir, run, "--resume")
    code, err = finish(proc)
    assert code == 0, err
    assert_same_run(run, reference)


def test_leftovers_of_killed_saves_are_cleaned_and_a_moved_aside_checkpoint_restored(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for name in ("step_4", "step_6", ".step_8.tmp-k2j4x9", ".best.old-4242", ".step_6.old-77", "notes"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "model.safetensors").write_bytes(b"x")
    (ckpts / ".step_9.tmp-file").write_text("a file, not a save's directory")
    (tmp_path / "run" / ".step_2.tmp-abc").mkdir()  # outside checkpoints/: not the trainer's
    done = clean_leftovers(tmp_path / "run")
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_9.tmp-file", "best", "notes", "step_4", "step_6"]
    assert (ckpts / "best" / "model.safetensors").is_file()  # the save killed between its renames
    assert (tmp_path / "run" / ".step_2.tmp-abc").is_dir()
    assert len(done) == 3 and any("restored" in line for line in done)


def test_sigint_saves_when_the_output_pipe_is_gone(sotu_dir, tmp_path):
    """`latentformer train ... 2>&1 | tee log`, then Ctrl-C: the shell's SIGINT ends `tee` too, so
    every later write to stdout/stderr fails; the checkpoint is saved all the same."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LATENTFORMER_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "train", "--data", str(sotu_dir), "--out", str(run),
                             *FLAGS, "--train.checkpoint_interval", "0", "--train.max_steps", "100000",
                             "--train.log_interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)
    proc.stdout.close()  # `tee` is gone
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    assert latest(run) > 0 and latest(run) == torch.load(step_dirs(run)[-1] / "train_state.pt", weights_only=True)["step"]
