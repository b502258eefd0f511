"""Bad input to `train` (and to the checkpoint loaders that generate/eval share): each case is one
line on stderr naming what is wrong, a non-zero exit, and no file changed anywhere in the case's
tree or the prepared data (names, sizes, mtimes and contents compared before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentformer.checkpoint import load
from latentformer.cli import main

from .conftest import TINY_MODEL_ARGS
from .test_cli import FAST


def snapshot(*roots: Path) -> dict[str, tuple]:
    tree = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None
            tree[str(path)] = (path.is_dir(), st.st_size if path.is_file() else 0, st.st_mtime_ns, digest)
    return tree


@pytest.fixture(scope="module")
def finished_run(sotu_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", str(sotu_dir), "--out", str(run), *TINY_MODEL_ARGS, *FAST, "--train.max_steps", "2"]) == 0
    return run


def new_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *TINY_MODEL_ARGS, *FAST, "--train.max_steps", "2", *extra]


# each case: (tmp, run, data) -> argv, after preparing the tree; the message's expected fragment
def user_dir_force(tmp, run, data):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("years of work")
    return new_run(data, tmp / "mine", "--force")


def unprepared_data_force(tmp, run, data):
    (tmp / "texts").mkdir()
    (tmp / "texts" / "a.txt").write_text("not prepared")
    return new_run(tmp / "texts", run, "--force")


def data_is_out(tmp, run, data):
    shutil.copytree(data, tmp / "data")
    return new_run(tmp / "data", tmp / "data", "--force")


def data_meta_without_dtype(tmp, run, data):
    shutil.copytree(data, tmp / "data")
    meta = json.loads((tmp / "data" / "meta.json").read_text())
    del meta["dtype"]
    (tmp / "data" / "meta.json").write_text(json.dumps(meta))
    return new_run(tmp / "data", run, "--force")


def out_contains_data(tmp, run, data):
    shutil.copytree(data, run / "data")
    return new_run(run / "data", run, "--force")


def out_contains_config(tmp, run, data):
    (run / "run.yaml").write_text("train:\n  max_steps: 2\n")
    return [*new_run(data, run, "--force"), "--config", str(run / "run.yaml")]


def out_is_a_file(tmp, run, data):
    (tmp / "file").write_text("x")
    return new_run(data, tmp / "file", "--force")


def existing_run_without_force(tmp, run, data):
    return new_run(data, run)


def resume_other_shape(tmp, run, data):
    return ["train", "--out", str(run), "--resume", "--model.d_model", "128"]


def resume_truncated_weights(tmp, run, data):
    weights = run / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["train", "--out", str(run), "--resume"]


def resume_state_without_optimizer(tmp, run, data):
    path = run / "checkpoints" / "step_2" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)
    return ["train", "--out", str(run), "--resume"]


def resume_corrupt_metrics(tmp, run, data):
    path = run / "metrics.jsonl"
    path.write_text("{torn\n" + path.read_text())  # not the last line: not a torn write
    return ["train", "--out", str(run), "--resume", "--train.max_steps", "4"]


def resume_binary_config(tmp, run, data):
    (run / "config.yaml").write_bytes(bytes(range(128, 256)) * 4)
    return ["train", "--out", str(run), "--resume"]


def bad_device(tmp, run, data):
    return ["train", "--out", str(run), "--resume", "--train.device", "bogus"]


def missing_cuda(tmp, run, data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["train", "--out", str(run), "--resume", "--train.device", "cuda"]


def huge_seed(tmp, run, data):
    return new_run(data, tmp / "new", "--train.seed", str(2**64))


def binary_config_file(tmp, run, data):
    (tmp / "run.yaml").write_bytes(bytes(range(256)))
    return [*new_run(data, tmp / "new"), "--config", str(tmp / "run.yaml")]


def edited_checkpoint_config(tmp, run, data):
    """generate/eval share checkpoint.load: a config.json that no longer fits its weights."""
    path = run / "checkpoints" / "best" / "config.json"
    meta = json.loads(path.read_text())
    meta["model"]["d_ff"] = 96
    path.write_text(json.dumps(meta))
    return ["eval", str(run), "--data", str(data)]


CASES = [
    (user_dir_force, "is not a run directory made by latentformer"),
    (unprepared_data_force, "has no meta.json"),
    (data_is_out, "is or contains the input"),
    (data_meta_without_dtype, "meta.json"),
    (out_contains_data, "is or contains the input"),
    (out_contains_config, "is or contains the input"),
    (out_is_a_file, "is not a directory"),
    (existing_run_without_force, "use --resume to continue it, --force to start over"),
    (resume_other_shape, "embed.weight has shape [512, 64] in the checkpoint but [512, 128] in the config"),
    (resume_truncated_weights, "step_2/model.safetensors is corrupt"),
    (resume_state_without_optimizer, "train_state.pt is not a train state of this trainer (missing optimizer)"),
    (resume_corrupt_metrics, "metrics.jsonl line 1 is not a JSON record"),
    (resume_binary_config, "config.yaml"),
    (bad_device, "train.device: must be auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
    (missing_cuda, "CUDA is not available"),
    (huge_seed, "train.seed: must be in [0, 2**32 - 1]"),
    (binary_config_file, "run.yaml"),
    (edited_checkpoint_config, "layers.0.ffn.gate_proj.weight has shape [128, 64] in the checkpoint but [96, 64]"),
]


@pytest.mark.parametrize("setup, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(setup, message, finished_run, sotu_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATENTFORMER_DEBUG", raising=False)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    argv = setup(tmp_path, run, sotu_dir)
    before = snapshot(tmp_path, sotu_dir)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1, err
    assert message in err[0] and "unexpected" not in err[0] and "corrupt" not in err[0].replace(message, ""), err[0]
    assert snapshot(tmp_path, sotu_dir) == before


def test_loading_on_a_missing_device_does_not_blame_the_checkpoint(finished_run):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="^device cuda: ") as e:
        load(finished_run, device="cuda")
    assert "corrupt" not in str(e.value)


def test_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(finished_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(finished_run / "checkpoints" / "best", ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["norm.weight"] = torch.ones(32)
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors does not match its config: norm.weight has shape \[32\] "
                                         r"in the checkpoint but \[64\] in the config"):
        load(ckpt)
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="has no model.safetensors"):
        load(ckpt)
