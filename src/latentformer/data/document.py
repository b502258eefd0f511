"""What every corpus source yields and is: a `Document` `(id, text)` and the `Source` interface.

Kept apart from `sources` (which resolves a `--source` string to a concrete source) so that
a source defined in its own module, such as `gutenberg`, depends on this and not on the resolver.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


class Document(NamedTuple):
    id: str
    text: str


def decode_text(data: bytes, where: str) -> str:
    """Strict UTF-8 decode with a clear error for binary / non-UTF-8 input (BOM dropped)."""
    if b"\x00" in data:
        raise ValueError(f"{where} looks binary (contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 (byte offset {e.start}); convert it to UTF-8 first") from None
    return text.removeprefix("\ufeff")


def read_text_file(path: Path) -> str:
    return decode_text(path.read_bytes(), str(path))


class Source:
    """Base class. `spec` is the user's string; `name` a short label."""

    spec: str

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def doc_ids(self) -> list[str]:
        """Ids of all documents, in `documents()` order (default: one pass over the documents)."""
        return [d.id for d in self.documents()]

    def fingerprint(self) -> str:
        raise NotImplementedError

    def paths(self) -> list[Path]:
        """The local files or directories the documents are read from (an output may not be or hold them)."""
        return []

    def info(self) -> dict:
        """Extra JSON-safe facts recorded in meta.json (e.g. books that failed to download)."""
        return {}
