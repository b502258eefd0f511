"""benchmarks/python_corpus.py, the corpus of the 125m comparison: one document per source file,
exact duplicates dropped, and a rebuild of the same sources keeps the prepare fingerprint (so a
comparison's finished cells stay valid on another machine) while other sources change it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from latentformer.data.sources import JsonlSource

ROOT = Path(__file__).resolve().parents[2]


def build(out: Path, *packages: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "python_corpus.py"), "--out", str(out), "--no-stdlib", "--packages", *packages]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_documents_and_a_fingerprint_that_follows_the_content(tmp_path):
    docs = build(tmp_path / "a" / "code.jsonl", "json", "email")
    ids = [d["id"] for d in docs]
    packages = [i.split("/")[0] for i in ids]
    assert packages == sorted(packages, key=["json", "email"].index) and "json/decoder.py" in ids  # in the order given
    import json as json_module

    assert next(d for d in docs if d["id"] == "json/decoder.py")["text"] == Path(json_module.decoder.__file__).read_text()
    assert len({d["text"] for d in docs}) == len(docs)  # exact duplicates written once
    manifest = json.loads((tmp_path / "a" / "code.jsonl.manifest.json").read_text())
    assert set(manifest["packages"]) == {"json", "email"}

    build(tmp_path / "b" / "code.jsonl", "json", "email")  # the same sources, built again elsewhere
    build(tmp_path / "c" / "code.jsonl", "json")
    fp = {k: JsonlSource(tmp_path / k / "code.jsonl", "text").fingerprint() for k in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]
