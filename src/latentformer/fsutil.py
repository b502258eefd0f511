"""Atomic filesystem writes (a reader sees the old version or the new one, never half of one) and the
marker that lets a command replace only the directories latentformer made."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    On error the temporary directory is removed and `path` is left untouched. An existing
    `path` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def inside(directory: str | Path, name: Any, source: str | Path) -> Path:
    """`directory / name` for a file name that `source` (an index, a metadata file) records, refused
    with a ValueError when the name is not a string, is absolute or climbs out with "..": a directory
    names only files inside itself. A symlink there is the directory's own (the hub cache's are)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source} names {name!r} where a file name inside {directory} belongs")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{source} names {name!r}, a path outside {directory}: refused")
    return Path(directory) / name


# Every directory a command creates (run, prepared data, export, comparison) carries this file, so
# that a later `--force` replaces only what latentformer provably made: {"kind": "<what>"}.
MARKER = ".latentformer.json"


def mark_output(directory: str | Path, kind: str) -> None:
    """Record in `directory` that latentformer made it, as a `kind` ("run", "data", "export", ...).
    Call it on the temporary directory of `atomic_directory` so the marker lands with the contents."""
    atomic_write_text(Path(directory) / MARKER, json.dumps({"kind": kind}) + "\n")


def output_kind(directory: str | Path) -> str | None:
    """The kind recorded by `mark_output`, or None (no marker, or an unreadable one)."""
    try:
        kind = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_output(out: str | Path, kind: str, force: bool, inputs: Iterable[str | Path] = (),
                 flag: str = "--out", recognise: Callable[[Path], bool] | None = None) -> bool:
    """Check, before anything is written or deleted, that the command may write `out`.

    `out` may not be, or contain, any of `inputs`. An existing non-empty `out` may be replaced only
    with `force`, and only if it is a `kind` directory latentformer made (its marker, or
    `recognise(out)` for directories made before markers existed). Raises ValueError naming the
    problem; returns True when `out` exists and will be replaced.
    """
    out = Path(out).expanduser().resolve()
    for item in inputs:
        src = Path(item).expanduser().resolve()
        if src == out or out in src.parents:
            raise ValueError(f"{flag} {out} is or contains the input {src}: choose another output directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    ours = output_kind(out) == kind or (recognise is not None and recognise(out))
    if not ours:
        raise ValueError(f"{flag} {out} exists, is not empty and is not a {kind} directory made by latentformer: "
                         "choose another path (nothing was changed)")
    if not force:
        raise ValueError(f"{flag} {out} exists: pass --force to replace it")
    return True
