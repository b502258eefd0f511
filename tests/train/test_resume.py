"""Run directories across invocations: --force, extending finished runs, recorded overrides, and
resuming past what a killed process or a user left in the run (a torn metrics line, stray dirs)."""

from __future__ import annotations

import json
import shutil

import yaml

from latentformer.checkpoint import step_dirs
from latentformer.cli import main
from latentformer.fsutil import MARKER

from .conftest import TINY_MODEL_ARGS
from .test_bad_runs import snapshot
from .test_cli import FAST


def train(data, out, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), *TINY_MODEL_ARGS, *FAST, *extra])


def steps(run) -> list[str]:
    return [p.name for p in step_dirs(run)]


def test_force_replaces_a_run_it_made_also_one_from_before_markers(sotu_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(sotu_dir, run, "--train.max_steps", "2") == 0
    assert json.loads((run / MARKER).read_text()) == {"kind": "run"}
    (run / "scratch.txt").write_text("made inside the run")
    (run / MARKER).unlink()  # a run directory written before runs were marked
    assert train(sotu_dir, run, "--train.max_steps", "1", "--force") == 0
    assert "--force: replacing the run directory" in capsys.readouterr().err
    assert not (run / "scratch.txt").exists() and (run / MARKER).is_file()
    assert steps(run) == ["step_1"]


def test_resume_extends_a_finished_run_records_the_override_then_has_nothing_to_do(sotu_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(sotu_dir, run, "--train.max_steps", "2") == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--train.max_steps", "4", "--no-sample"]) == 0
    err = capsys.readouterr().err
    assert f"config changed on resume, recorded in {run / 'config.yaml'} for later resumes: train.max_steps 2 -> 4" in err
    assert steps(run) == ["step_2", "step_4"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "--no-sample"]) == 0  # the recorded 4 steps are done
    assert "already ended at step 4 (max_steps): nothing to train" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_run_stopped_by_its_time_budget_extends_with_a_larger_max_steps(sotu_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(sotu_dir, run, "--train.max_steps", "100000", "--train.max_time_minutes", "0.003",
                 "--train.eval_tokens", "512") == 0
    out = capsys.readouterr().out
    assert "(max_time)" in out
    stopped = int(steps(run)[-1].split("_")[1])
    assert main(["train", "--out", str(run), "--resume", "--train.max_steps", str(stopped + 3), "--no-sample"]) == 0
    err = capsys.readouterr().err
    assert "stopped on its 0.003-minute budget: it trains on" in err
    assert steps(run)[-1] == f"step_{stopped + 3}"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_time_minutes"] == 0


def test_a_torn_metrics_line_and_a_stray_step_dir_do_not_block_resume(sotu_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(sotu_dir, run, "--train.max_steps", "2") == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.9')  # the process was killed while writing
    (run / "checkpoints" / "step_final").mkdir()
    (run / "checkpoints" / "step_final" / "keep.txt").write_text("a user's copy")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--train.max_steps", "4", "--no-sample"]) == 0
    assert f"{run / 'metrics.jsonl'}: dropped a torn last line" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("eval")] == [2, 4]
    assert (run / "checkpoints" / "step_final" / "keep.txt").is_file()
    assert steps(run) == ["step_2", "step_4"]
    shutil.rmtree(run / "checkpoints" / "step_4")
    assert main(["eval", str(run), "--data", str(sotu_dir), "--json"]) == 0  # best/ still found
