"""Shared fixtures of the data tests: one sotu/gpt2 preparation per session (~1 s)."""

import pytest

from latentformer.data.prepare import prepare


@pytest.fixture(scope="session")
def sotu_gpt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("sotu") / "gpt2"
    meta = prepare("sotu", "gpt2", out, workers=2, progress=False)
    return out, meta


def write_docs(directory, texts):
    """A directory of small .txt documents d00.txt, d01.txt, ..."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (directory / f"d{i:02d}.txt").write_text(t, encoding="utf-8")
    return directory
