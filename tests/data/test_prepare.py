import json

import numpy as np
import pytest

from latentformer.cli import main
from latentformer.data.dataset import TokenData
from latentformer.data.prepare import prepare, split_documents
from latentformer.data.sources import open_source
from latentformer.data.tokenizer import load_tokenizer

from .conftest import write_docs

DOCS = ["The first document.\n", "Second one, with ünïcödé and 🤖.", "third\n\nhas paragraphs", "4th: don't   stop", "fifth"] * 2


def test_sotu_gpt2(sotu_gpt2):
    out, meta = sotu_gpt2
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 2_200_000 <= total <= 2_600_000
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "gpt2"
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 249
    data = TokenData(out)
    train, val = data.tokens("train"), data.tokens("val")
    assert len(train) == meta["splits"]["train"]["tokens"] and train.dtype == np.uint16
    # every document ends with eot: one eot per document, and the splits end with one
    assert int((train == 50256).sum()) == meta["splits"]["train"]["documents"] and train[-1] == 50256
    assert int((val == 50256).sum()) == meta["splits"]["val"]["documents"]
    # no document in both splits: val ids are exactly the recomputed split, disjoint from train ids
    ids = open_source("sotu").doc_ids()
    val_ids = set(meta["val_doc_ids"])
    assert val_ids == split_documents(ids, seed=1337) and len(val_ids) >= 1
    train_ids = set(ids) - val_ids
    assert train_ids and not (train_ids & val_ids)
    # val.bin is exactly the val documents, in source order, each followed by eot
    tok = load_tokenizer(out)
    docs = {d.id: d.text for d in open_source("sotu").documents()}
    expect = []
    for i in ids:
        if i in val_ids:
            expect += tok.encode(docs[i]) + [tok.eot_id]
    assert val.tolist() == expect
    assert meta["splits"]["val"]["bytes"] == sum(len(docs[i].encode()) for i in val_ids)
    assert 4.0 < data.bytes_per_token("train") < 6.0


def test_rerun_is_noop(sotu_gpt2):
    out, meta = sotu_gpt2
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare("sotu", "gpt2", out, workers=2, progress=False)
    assert again == meta
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_deterministic_independent_of_workers(tmp_path):
    src = write_docs(tmp_path / "c", DOCS)
    a = prepare(str(src), "gpt2", tmp_path / "a", workers=1, progress=False)
    b = prepare(str(src), "gpt2", tmp_path / "b", workers=2, progress=False)
    assert a["fingerprint"] == b["fingerprint"] and a["val_doc_ids"] == b["val_doc_ids"]
    for s in ("train", "val"):
        assert (tmp_path / "a" / f"{s}.bin").read_bytes() == (tmp_path / "b" / f"{s}.bin").read_bytes()


def test_changed_args_rebuild_and_force(tmp_path):
    src = write_docs(tmp_path / "c", DOCS)
    out = tmp_path / "out"
    m1 = prepare(str(src), "byte", out, val_docs=2, progress=False)
    assert m1["splits"]["val"]["documents"] == 2 and m1["dtype"] == "uint16"
    with pytest.raises(ValueError, match="prepared from other inputs .* pass --force"):
        prepare(str(src), "byte", out, val_docs=3, progress=False)  # another split replaces only with force
    assert TokenData(out).meta["fingerprint"] == m1["fingerprint"]
    m2 = prepare(str(src), "byte", out, val_docs=3, progress=False, force=True)
    assert m2["splits"]["val"]["documents"] == 3
    assert TokenData(out).meta["fingerprint"] == m2["fingerprint"]
    before = (out / "meta.json").stat().st_mtime_ns
    prepare(str(src), "byte", out, val_docs=3, progress=False, force=True)
    assert (out / "meta.json").stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]  # no temp leftovers


def test_marker_legacy_dirs_and_stale_cache(tmp_path):
    from latentformer.fsutil import MARKER, output_kind

    src = write_docs(tmp_path / "c", DOCS)
    out = tmp_path / "out"
    m1 = prepare(str(src), "byte", out, val_docs=2, progress=False)
    assert output_kind(out) == "data"
    (out / MARKER).unlink()  # a directory prepared before markers existed: recognised by its meta.json
    m2 = prepare(str(src), "byte", out, val_docs=3, progress=False, force=True)
    assert m2["fingerprint"] != m1["fingerprint"] and output_kind(out) == "data"
    # the data cache replaces its own stale entries without force, never someone else's directory
    m3 = prepare(str(src), "byte", out, val_docs=2, progress=False, replace_stale=True)
    assert m3["fingerprint"] == m1["fingerprint"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "meta.json").write_text('{"format": "my own"}')
    with pytest.raises(ValueError, match="not a data directory made by latentformer"):
        prepare(str(src), "byte", tmp_path / "mine", progress=False, replace_stale=True)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["meta.json"]


def test_leftovers_of_killed_prepares_are_removed(tmp_path):
    src = write_docs(tmp_path / "c", DOCS)
    killed = [tmp_path / ".out.tmp-k1", tmp_path / ".out.old-123" / "out"]  # what atomic_directory leaves
    for d in killed:
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"\0" * 100)
    others = [tmp_path / ".other.tmp-k2", tmp_path / "out.tmp-not-hidden"]
    for d in others:
        d.mkdir()
    prepare(str(src), "byte", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", "out", *(d.name for d in others)])
    killed[0].mkdir()  # a prepare killed while rebuilding an output that is up to date
    prepare(str(src), "byte", tmp_path / "out", progress=False)
    assert not killed[0].exists()


def test_bpe_4096_on_sotu_roundtrips(tmp_path):
    # Train on a third of sotu (all of it takes ~8 s here); the round trip is over every document.
    src = open_source("sotu")
    sub = tmp_path / "sotu_sub"
    docs = list(src.documents())
    write_docs(sub, [d.text for d in docs[::3]])
    meta = prepare(str(sub), "bpe:4096", tmp_path / "bpe", progress=False)
    tok = load_tokenizer(tmp_path / "bpe")
    assert tok.kind == "bpe" and tok.vocab_size == 4096 == meta["tokenizer"]["vocab_size"]
    assert meta["dtype"] == "uint16"
    texts = [d.text for d in docs]
    assert [tok.decode(ids) for ids in tok.encode_arrays(texts, 2)] == texts
    data = TokenData(tmp_path / "bpe")
    val = data.tokens("val").tolist()
    assert tok.decode(val).count("<|endoftext|>") == meta["splits"]["val"]["documents"]


def test_bpe_trained_on_train_split_only(tmp_path):
    # A val-only word must not become a single token.
    texts = ["common words here " * 30 + f"doc{i}" for i in range(6)]
    src = write_docs(tmp_path / "c", texts)
    val_ids = split_documents(open_source(str(src)).doc_ids(), val_docs=1, seed=1337)
    (vid,) = val_ids
    (src / vid).write_text("zyxwvutsrq " * 200)
    prepare(str(src), "bpe:300", tmp_path / "o", val_docs=1, progress=False)
    tok = load_tokenizer(tmp_path / "o")
    assert len(tok.encode("zyxwvutsrq")) > 3
    assert len(tok.encode("common")) == 1


def test_uint32_for_large_vocab(tmp_path, monkeypatch):
    import latentformer.data.prepare as P

    assert P.token_dtype(65536) == np.uint16 and P.token_dtype(65537) == np.uint32


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: str(p / "missing"), "no such file or directory"),
        (lambda p: str(write_docs(p / "d0", [""])), "is empty"),
        (lambda p: str(write_docs(p / "d", ["", "  ", ""])), "contains no text|split is empty"),
        (lambda p: str(write_docs(p / "d1", ["only one"])), "at least 2"),
    ],
)
def test_bad_sources_leave_nothing(tmp_path, setup, match):
    spec = setup(tmp_path)
    before = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match=match):
        prepare(spec, "byte", tmp_path / "out", progress=False)
    assert set(tmp_path.iterdir()) == before  # nothing half-written


def test_error_midway_leaves_nothing(tmp_path):
    src = write_docs(tmp_path / "c", DOCS)
    (src / "zz_bad.txt").write_bytes(b"ok\xffnot utf8")
    before = set(tmp_path.iterdir())
    with pytest.raises(ValueError, match="zz_bad.txt is not valid UTF-8"):
        prepare(str(src), "gpt2", tmp_path / "out", progress=False)
    assert set(tmp_path.iterdir()) == before


def test_bad_arguments(tmp_path):
    src = str(write_docs(tmp_path / "c", DOCS))
    with pytest.raises(ValueError, match="val-fraction"):
        prepare(src, "byte", tmp_path / "o", val_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="--val-docs must be between 1 and 9"):
        prepare(src, "byte", tmp_path / "o", val_docs=10, progress=False)
    with pytest.raises(ValueError, match="bpe:<vocab size>"):
        prepare(src, "bpe:big", tmp_path / "o", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("x")
    for force in (False, True):  # a directory prepare did not make is never replaced, even with force
        with pytest.raises(ValueError, match="not a data directory made by latentformer"):
            prepare(src, "byte", tmp_path / "busy", progress=False, force=force)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["precious.txt"]


def test_tokendata_errors(tmp_path):
    with pytest.raises(ValueError, match="no meta.json"):
        TokenData(tmp_path)
    src = str(write_docs(tmp_path / "c", DOCS))
    prepare(src, "byte", tmp_path / "o", progress=False)
    with open(tmp_path / "o" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated"):
        TokenData(tmp_path / "o").tokens("train")


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prepare_and_errors(tmp_path, capsys):
    src = str(write_docs(tmp_path / "c", DOCS))
    rc, out, err = _cli(capsys, "prepare", "--source", src, "--tokenizer", "gpt2", "--out", str(tmp_path / "o"), "--no-progress", "--val-docs", "2")
    assert rc == 0 and "train" in out and "tokens/s" in out
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["splits"]["val"]["documents"] == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    cases = [
        (["--source", str(tmp_path / "nope")], "no such file"),
        (["--source", str(tmp_path / "bad.jsonl")], "line 2: no field 'text'"),
        (["--source", src, "--tokenizer", "bogus"], "unknown tokenizer"),
    ]
    for args, match in cases:
        rc, out, err = _cli(capsys, "prepare", *args, "--out", str(tmp_path / "o2"), "--no-progress")
        assert rc == 1 and match in err and err.count("\n") == 1, err
        assert not (tmp_path / "o2").exists()


def test_cli_tokenizer(tmp_path, capsys):
    src = str(write_docs(tmp_path / "c", DOCS * 5))
    rc, out, err = _cli(capsys, "tokenizer", "train", "--source", src, "--vocab-size", "300", "--out", str(tmp_path / "t.json"))
    assert rc == 0, err
    tok = load_tokenizer(tmp_path / "t.json")
    assert tok.decode(tok.encode(DOCS[1])) == DOCS[1]
    rc, out, err = _cli(capsys, "tokenizer", "encode", "--tokenizer", "gpt2", "Hello world")
    assert rc == 0 and out.splitlines()[0] == "[15496, 995]"
    rc, out, err = _cli(capsys, "tokenizer", "decode", "--tokenizer", "gpt2", "15496", "995")
    assert rc == 0 and out == "Hello world\n"
    rc, out, err = _cli(capsys, "tokenizer", "train", "--source", src, "--vocab-size", "10", "--out", str(tmp_path / "u.json"))
    assert rc == 1 and ">= 257" in err and err.count("\n") == 1
