"""`latentformer compare` end to end on a micro family: files, schema, figures, skip and resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from latentformer.cli import main
from latentformer.compare import report, runner

FILES = ["results.json", "report.md", "report.html", "compare.json", "decode.json", ".latentformer.json"]
FIGURES = ["pareto", "loss_curves", "decode_throughput", "max_batch"]
CELLS = ["mha-s0", "mla-s0", "mha-s1", "mla-s1"]


def compare(family, data, out, *extra) -> int:
    return main(["compare", "--family", str(family), "--data", str(data), "--out", str(out), *extra])


def forbid_training(monkeypatch) -> None:
    """From here on, constructing a Trainer fails the test: every cell must be skipped."""
    import latentformer.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(trainer.Trainer, "__init__", refuse)


@pytest.fixture(scope="module")
def finished(micro_family, micro_data, tmp_path_factory):
    """One 2-variant x 2-seed comparison, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    assert compare(micro_family, micro_data, out) == 0
    return out


def test_every_file_is_written(finished):
    for name in FILES:
        assert (finished / name).is_file(), name
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (finished / "figures" / f"{name}.{ext}").stat().st_size > 5000, (name, ext)
    for cell in CELLS:
        run = finished / "cells" / cell
        assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
        assert runner.read_state(run)["status"] == "done"
        assert (finished / "logs" / f"{cell}.log").is_file()


def test_cells_are_ordinary_run_directories(finished, micro_data):
    assert main(["eval", str(finished / "cells" / "mla-s1"), "--data", str(micro_data), "--json"]) == 0


def test_results_validate_against_the_schema(finished):
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads((finished / "results.json").read_text())
    jsonschema.validate(data, report.schema())
    assert [v["name"] for v in data["variants"]] == ["mha", "mla"]
    mha, mla = data["variants"]
    assert mla["val_loss"]["n"] == 2 and len(mla["val_loss"]["values"]) == 2
    assert mla["val_loss"]["mean"] == pytest.approx(np.mean(mla["val_loss"]["values"]))
    assert mla["kv_cache_bytes_per_token"] == (32 + 8) * 2 * 2 and mha["kv_cache_bytes_per_token"] == 2 * 64 * 2 * 2
    assert {r["mode"] for r in mla["decode"]} == {"absorb", "naive"} and {r["mode"] for r in mha["decode"]} == {"standard"}
    assert len(mla["decode"]) == 2 * 2 * 2 and all(r["tokens_per_s"]["median"] > 0 for r in mla["decode"])
    # decode is timed once per variant (its architecture), once per interleaved round; quality on every seed
    assert all(r["tokens_per_s"]["n"] == data["settings"]["decode_rounds"] == 5 for r in mla["decode"])
    assert not any("decode" in c for c in data["cells"])
    windows = [w for c in data["cells"] if c["variant"] == "mla" for w in c["train"]["window_tokens_per_s"]]
    assert mla["train_tokens_per_s"]["values"] == windows and mla["train_tokens_per_s"]["median"] == np.median(windows)
    curves = [c["curve"] for c in data["cells"] if c["variant"] == "mla"]
    assert mla["best_val_loss"]["values"] == [min(p["loss"] for p in c) for c in curves]
    assert mla["best_val_tokens"]["n"] == 2 and mla["best_val_tokens"]["values"][0] in (512, 1024, 1536)
    ctx = mla["max_batch"][0]["context"]
    assert mla["max_batch"][0]["batch_size"] == int(80 * 2**30 // (160 * ctx))
    assert [p["tokens"] for p in mla["curve"]] == [512, 1024, 1536]
    assert data["settings"]["tokens_per_cell"] == 1536 and data["cells"][0]["train"]["steps"] == 6
    assert abs(mha["param_deviation"]) <= 0.02 and mha["matched_d_ff"] is not None
    broken = {k: v for k, v in data.items() if k != "variants"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report.schema())
    data["cells"][0]["status"] = "lost"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, report.schema())


def test_figures_are_real_images(finished):
    import matplotlib.image

    for name in FIGURES:
        img = matplotlib.image.imread(finished / "figures" / f"{name}.png")
        assert img.shape[0] >= 400 and img.shape[1] >= 600, name
        rgb = (img[..., :3] * 255).astype(np.int64)
        colors = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
        assert len(colors) > 20, name  # not blank, not one colour: lines, text, markers
        assert (finished / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_reports_hold_tables_and_figures(finished):
    md = (finished / "report.md").read_text()
    assert "| mla | mla |" in md and "![pareto](figures/pareto.png)" in md
    page = (finished / "report.html").read_text()
    assert page.count("<svg") == len(FIGURES) and "<table>" in page
    # self-contained: no file or URL beside it (an SVG's own "#id" references are inside the page)
    assert not re.search(r'(?:src|href)="(?!#)', page)


def test_second_invocation_trains_nothing(finished, micro_family, micro_data, monkeypatch, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    forbid_training(monkeypatch)
    assert compare(micro_family, micro_data, out) == 0
    assert main(["compare", "--out", str(out), "--report-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()} == stamps
    assert json.loads((out / "results.json").read_text())["variants"] == json.loads((finished / "results.json").read_text())["variants"]


def test_cells_must_match_the_config_except_in_bookkeeping(finished, micro_family, micro_data, monkeypatch, tmp_path, capsys):
    """Another learning rate is refused, naming the field; how often a cell saves or logs may differ
    (the finished cells are kept and nothing is trained)."""
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    assert compare(micro_family, micro_data, out, "--train.lr", "0.5", "--no-report") == 1
    err = capsys.readouterr().err
    assert "was trained with train.lr=" in err and len(err.strip().splitlines()) == 1
    forbid_training(monkeypatch)
    assert compare(micro_family, micro_data, out, "--train.checkpoint_interval", "0", "--train.log_interval", "3", "--no-report") == 0


def test_cells_saved_before_a_field_existed_count_as_its_default(finished, micro_family, micro_data, monkeypatch, tmp_path):
    """A cell written before model.mtp_depth and train.optimizer existed (its config.yaml lacks them)
    was trained as their defaults (no MTP, AdamW) and is kept, not refused."""
    import yaml

    out = tmp_path / "older"
    shutil.copytree(finished, out)
    for saved in (out / "cells").glob("*/config.yaml"):
        cfg = yaml.safe_load(saved.read_text())
        cfg["model"].pop("mtp_depth", None)
        for key in ("optimizer", "mtp_weight"):
            cfg["train"].pop(key)
        saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    forbid_training(monkeypatch)
    assert compare(micro_family, micro_data, out, "--no-report") == 0


def test_decode_is_timed_for_cells_carried_without_checkpoints(finished, micro_family, micro_data, monkeypatch, tmp_path):
    """Cells trained elsewhere come with their cell.json, config and curves but no weights: every
    variant is still timed (its architecture), and nothing is trained."""
    out = tmp_path / "carried"
    shutil.copytree(finished, out)
    carried = list((out / "cells").glob("*/checkpoints"))
    assert len(carried) == len(CELLS)
    for ckpts in carried:
        shutil.rmtree(ckpts)
    (out / "decode.json").unlink()
    forbid_training(monkeypatch)
    assert compare(micro_family, micro_data, out, "--no-report") == 0
    decode = json.loads((out / "decode.json").read_text())
    assert decode["settings"]["variants"] == ["mha", "mla"]
    assert {(r["variant"], r["mode"]) for r in decode["rows"]} == {("mha", "standard"), ("mla", "absorb"), ("mla", "naive")}
    assert all(len(r["tokens_per_s"]) == 5 for r in decode["rows"])


def test_training_speeds_compare_within_one_device(finished, tmp_path):
    """Cells finished on two kinds of GPU: each variant's training speed comes from the cells of the
    device that trained the most (the earliest on a tie), else from its own, and the report says so."""
    out = tmp_path / "mixed"
    shutil.copytree(finished, out)

    def move(cell: str, device: str) -> None:
        path = out / "cells" / cell / "cell.json"
        state = json.loads(path.read_text())
        state["device"] = device
        path.write_text(json.dumps(state))

    def speeds() -> dict:
        assert main(["compare", "--out", str(out), "--report-only"]) == 0
        data = json.loads((out / "results.json").read_text())
        cells = {c["name"]: c for c in data["cells"]}
        return data, {v["name"]: (v["train_device"], v["train_tokens_per_s"]["values"]) for v in data["variants"]}, cells

    cpu = json.loads((out / "cells" / "mha-s0" / "cell.json").read_text())["device"]
    move("mha-s1", "GPU B")  # the CPU has 3 cells: it gives every speed
    data, by, cells = speeds()
    assert by["mha"] == (cpu, cells["mha-s0"]["train"]["window_tokens_per_s"])
    assert by["mla"][1] == cells["mla-s0"]["train"]["window_tokens_per_s"] + cells["mla-s1"]["train"]["window_tokens_per_s"]
    move("mha-s0", "GPU B")  # 2 cells each: GPU B trained the first cell; mla has none there and keeps its own
    data, by, cells = speeds()
    assert by["mha"][0] == "GPU B" and by["mla"][0] == cpu
    assert by["mha"][1] == cells["mha-s0"]["train"]["window_tokens_per_s"] + cells["mha-s1"]["train"]["window_tokens_per_s"]
    md = (out / "report.md").read_text()
    assert f"GPU B (2 cells), {cpu} (2 cells)" in md
    assert "from the cells trained on GPU B only" in md and f"(mla: {cpu})" in md


def test_decode_figures_name_the_device_that_timed_them(finished, tmp_path):
    """Without decode.json the decode rows are the cells' own (finished before it): the devices
    named for them are those cells' devices, not every device that trained a cell."""
    out = tmp_path / "legacy"
    shutil.copytree(finished, out)
    decode = json.loads((out / "decode.json").read_text())
    (out / "decode.json").unlink()
    for cell in CELLS:  # seed 0 carries its variant's rows, timed on "GPU A"; seed 1 trained on "GPU B" with none
        path = out / "cells" / cell / "cell.json"
        state = json.loads(path.read_text())
        variant, seed = cell.rsplit("-s", 1)
        if seed == "0":
            state["device"] = "GPU A"
            state["decode"] = [{k: r[k] for k in ("mode", "batch_size", "context")} | {"tokens_per_s": r["tokens_per_s"][0]}
                               for r in decode["rows"] if r["variant"] == variant]
        else:
            state["device"] = "GPU B"
        path.write_text(json.dumps(state))
    assert main(["compare", "--out", str(out), "--report-only"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["devices"] == ["GPU A", "GPU B"] and data["environment"]["decode_devices"] == ["GPU A"]
    decode_section = (out / "report.md").read_text().split("## Decode throughput", 1)[1].split("##", 1)[0]
    assert "timed on GPU A." in decode_section and "GPU B" not in decode_section
    # with decode.json: its device alone
    assert json.loads((finished / "results.json").read_text())["environment"]["decode_devices"] == [decode["device"]]


def test_killed_comparison_resumes(micro_family, micro_data, tmp_path):
    """SIGKILL a comparison after its first cell finished; the re-run keeps that cell and completes the rest."""
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "compare", "--family", str(micro_family), "--data",
                             str(micro_data), "--out", str(out), "--seeds", "1", "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first = out / "cells" / "mha-s0"
    deadline = time.monotonic() + 120
    while (runner.read_state(first) or {}).get("status") != "done":
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    kept = (first / "cell.json").read_text()
    assert runner.read_state(out / "cells" / "mla-s0") is None  # the second cell was cut off
    assert compare(micro_family, micro_data, out, "--no-report") == 0
    assert (first / "cell.json").read_text() == kept
    data = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in data["cells"]] == ["done", "done"]
    assert data["cells"][0]["val"] == json.loads(kept)["val"]
    assert not (out / "report.md").exists()  # --no-report: results only


def test_workers_run_cells_in_their_own_processes(finished, tmp_path):
    """The multi-GPU path on a CPU: one worker process per 'device', each running a cell; the results
    are those of the in-process run (same model, data and seeds, CPU fp32)."""
    import io

    from rich.console import Console

    out = tmp_path / "workers"
    out.mkdir()
    shutil.copy(finished / ".latentformer.json", out)
    plan = runner.load_plan(finished)
    plan.overrides["train.threads"] = 1  # two workers on a 2-core machine
    runner.save_plan(out, plan)
    matrix = runner.build(plan)
    todo = matrix.cells[:2]
    log = io.StringIO()
    progress = runner.MatrixProgress(Console(file=log), matrix, out)
    assert runner._workers(out, todo, ["0", "1"], progress) == []
    assert "on gpu 0" in log.getvalue() and "on gpu 1" in log.getvalue()
    for cell in todo:
        mine, theirs = runner.read_state(out / "cells" / cell.name), runner.read_state(finished / "cells" / cell.name)
        assert mine["status"] == "done"
        assert mine["val"]["loss"] == pytest.approx(theirs["val"]["loss"], rel=1e-4)  # other thread count: rounding
    assert runner.read_state(out / "cells" / matrix.cells[2].name) is None


def test_unfinished_measurement_is_redone_without_training(finished, micro_family, micro_data, monkeypatch, tmp_path):
    """A cell whose training finished but whose measurement was cut off is measured, not retrained."""
    out = tmp_path / "trained"
    shutil.copytree(finished, out)
    cell = out / "cells" / "mla-s1"
    state = runner.read_state(cell)
    runner.write_state(cell, {k: state[k] for k in ("status", "cell", "variant", "seed_index", "seed", "train_summary")} | {"status": "trained"})
    import latentformer.train.trainer as trainer

    monkeypatch.setattr(trainer.Trainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("trained again")))
    assert compare(micro_family, micro_data, out, "--no-report") == 0
    again = runner.read_state(cell)
    assert again["status"] == "done" and again["val"] == state["val"]


def test_user_errors_are_one_line(micro_family, micro_data, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert compare(micro_family, micro_data, foreign) == 1
    assert "not a compare directory" in capsys.readouterr().err and (foreign / "keep.txt").exists()
    assert main(["compare", "--out", str(tmp_path / "none"), "--report-only"]) == 1
    assert "not a comparison directory" in capsys.readouterr().err
    assert compare(micro_family, micro_data, tmp_path / "x", "--variants", "mla:kv_lora_rank=4:d_ff=1024", "--no-report") == 1
    err = capsys.readouterr().err
    assert "more than 2%" in err and "--allow-mismatch" in err and len(err.strip().splitlines()) == 1
    assert compare(micro_family, micro_data, tmp_path / "y", "--train.max_time_minutes", "5") == 1
    assert "cannot be set" in capsys.readouterr().err
    assert compare(micro_family, micro_data, micro_data.parent) == 1  # holds the input data
    assert "contains the input" in capsys.readouterr().err


def _edit_json(edit):
    return lambda text: json.dumps(edit(json.loads(text)))


CELL_JSON, PLAN_JSON = "cells/mla-s1/cell.json", "compare.json"
DAMAGE = {  # what a crash, a full disk or a hand edit leaves: (file, edit of its text, the error names)
    "cell-truncated": (CELL_JSON, lambda t: t[: len(t) // 2], "cell.json is damaged"),
    "cell-list": (CELL_JSON, lambda t: "[]", "cell.json must be an object, got a list"),
    "cell-val-string": (CELL_JSON, _edit_json(lambda c: {**c, "val": "x"}), "cell.json.val must be an object, got a string"),
    "cell-loss-string": (CELL_JSON, _edit_json(lambda c: {**c, "val": {**c["val"], "loss": "2.5"}}),
                         "cell.json.val.loss must be a number, got '2.5'"),
    "cell-no-curve": (CELL_JSON, _edit_json(lambda c: {k: v for k, v in c.items() if k != "curve"}),
                      "cell.json: field 'curve' is missing"),
    "cell-bad-status": (CELL_JSON, _edit_json(lambda c: {**c, "status": "finished"}), "field 'status' must be one of"),
    "plan-truncated": (PLAN_JSON, lambda t: t[:40], "compare.json is corrupt"),
    "plan-list": (PLAN_JSON, lambda t: "[1]", "compare.json: Plan: expected a mapping, got list"),
    "plan-seeds-string": (PLAN_JSON, _edit_json(lambda p: {**p, "seeds": "two"}), "compare.json: seeds"),
    "plan-family-list": (PLAN_JSON, _edit_json(lambda p: {**p, "family": ["micro"]}), "compare.json: "),
    "plan-no-variants": (PLAN_JSON, _edit_json(lambda p: {k: v for k, v in p.items() if k != "variants"}),
                         "compare.json: "),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_report_only_refuses_a_damaged_file_and_keeps_the_results(finished, tmp_path, capsys, case):
    name, edit, match = DAMAGE[case]
    out = tmp_path / "damaged"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("checkpoints", "figures"))
    path = out / name
    path.write_text(edit(path.read_text()))
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--report-only"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and str(path) in err, err
    assert (out / "results.json").read_bytes() == before


def test_results_with_fewer_finished_cells_replace_them_only_with_force(finished, tmp_path, capsys):
    """A cell directory lost (moved, deleted): its numbers stay in results.json unless --force."""
    out = tmp_path / "lost"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.rmtree(out / "cells" / "mla-s1")
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--report-only"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 4 finished cells" in err and "--force" in err, err
    assert (out / "results.json").read_bytes() == before
    assert main(["compare", "--out", str(out), "--report-only", "--force"]) == 0
    assert [c["status"] for c in json.loads((out / "results.json").read_text())["cells"]].count("done") == 3


def test_a_training_override_is_its_own_cell_and_labelled(micro_family, micro_data, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "cmp"
    assert compare(micro_family, micro_data, out, "--variants", "mla,mla:train.optimizer=muon", "--seeds", "1") == 0
    cfgs = {c: (out / "cells" / c / "config.yaml").read_text() for c in ("mla-s0", "mla_train.optimizer=muon-s0")}
    assert "optimizer: adamw" in cfgs["mla-s0"] and "optimizer: muon" in cfgs["mla_train.optimizer=muon-s0"]
    data = json.loads((out / "results.json").read_text())
    jsonschema.validate(data, report.schema())
    assert [(v["name"], v["train_overrides"]) for v in data["variants"]] == [("mla", {}), ("mla:train.optimizer=muon", {"optimizer": "muon"})]
    assert data["variants"][0]["val_loss"]["values"] != data["variants"][1]["val_loss"]["values"]
    md = (out / "report.md").read_text()
    assert "| variant | training |" in md
    assert "| mla | common recipe | mla |" in md and "| mla:train.optimizer=muon | optimizer=muon | mla |" in md


def test_a_variant_added_to_a_finished_comparison_trains_only_its_cells(finished, micro_family, micro_data, tmp_path):
    """The study-then-one-more workflow: --variants naming a finished variant and a training override of
    it keeps the finished cells as they are and trains the new variant's cells only."""
    out = tmp_path / "more"
    shutil.copytree(finished, out)
    kept = {c: (out / "cells" / c / "cell.json").read_text() for c in ("mla-s0", "mla-s1")}
    assert compare(micro_family, micro_data, out, "--variants", "mla,mla:train.optimizer=muon", "--no-report") == 0
    for cell, text in kept.items():
        assert (out / "cells" / cell / "cell.json").read_text() == text
    data = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["mla", "mla:train.optimizer=muon"]
    assert [c["status"] for c in data["cells"]] == ["done"] * 4
    assert sorted(p.name for p in (out / "cells").iterdir() if p.is_dir() and "muon" in p.name) == \
        ["mla_train.optimizer=muon-s0", "mla_train.optimizer=muon-s1"]
