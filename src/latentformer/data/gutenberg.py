"""Project Gutenberg books by id: download (with retries), cache, strip the PG header and licence.

    --source gutenberg:1342,84,11

Mirror: `--gutenberg-mirror URL` or env LATENTFORMER_GUTENBERG_MIRROR, default
https://www.gutenberg.org. A mirror URL containing "{id}" is used as a template; otherwise
"/cache/epub/{id}/pg{id}.txt" (gutenberg.org's plain-text layout) is appended to it.
Cache: $LATENTFORMER_CACHE/gutenberg (default ~/.cache/latentformer/gutenberg); raw files
are cached and stripped on read, so a cached book is never downloaded again.
Transient errors (HTTP 5xx/429, timeouts, refused or reset connections) are retried with
exponential backoff; other failures (e.g. 404) are reported per id. All ids failing is a ValueError.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from latentformer.data.document import Document, Source, decode_text

DEFAULT_MIRROR = "https://www.gutenberg.org"
_DEFAULT_PATH = "/cache/epub/{id}/pg{id}.txt"

# "*** START OF THE PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***" (also "THIS", older "ETEXT").
_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT).*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT).*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The book's text between the PG start and end markers (whole text if a marker is missing)."""
    m = _START.search(text)
    if m:
        text = text[m.end() :]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    return text.strip() + "\n"


def default_cache_dir() -> Path:
    root = os.environ.get("LATENTFORMER_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "latentformer") / "gutenberg"


def book_url(mirror: str, book_id: int) -> str:
    mirror = mirror.rstrip("/")
    return mirror.format(id=book_id) if "{id}" in mirror else mirror + _DEFAULT_PATH.format(id=book_id)


def _transient(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in (408, 429)
    if isinstance(err, urllib.error.URLError):
        # DNS failure (gaierror) means no network or a wrong mirror: retrying will not help
        return isinstance(err.reason, OSError) and not isinstance(err.reason, socket.gaierror)
    # timeouts, resets, truncated bodies (http.client.IncompleteRead and friends)
    return isinstance(err, (TimeoutError, ConnectionError, http.client.HTTPException))


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    return f"{type(err).__name__}: {err}"


_NET_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def download(url: str, *, retries: int = 4, backoff: float = 1.0, timeout: float = 30.0) -> bytes:
    """GET `url`; retry transient errors `retries` times, sleeping backoff * 2**attempt seconds."""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.read()
        except _NET_ERRORS as e:
            if attempt == retries or not _transient(e):
                raise
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


class GutenbergSource(Source):
    """Books by id, one document each (id "pg<N>"). `failed` maps ids that could not be fetched to why."""

    def __init__(
        self,
        ids: list[int],
        *,
        mirror: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 30.0,
    ) -> None:
        if not ids:
            raise ValueError("gutenberg source: no book ids given (gutenberg:<id>,<id>,...)")
        self.ids = list(dict.fromkeys(ids))  # de-duplicated, order kept
        self.mirror = mirror or os.environ.get("LATENTFORMER_GUTENBERG_MIRROR") or DEFAULT_MIRROR
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.spec = "gutenberg:" + ",".join(map(str, self.ids))
        self.failed: dict[int, str] = {}
        self._fetched = False

    @classmethod
    def from_spec(cls, spec: str, **kw) -> GutenbergSource:
        body = spec.split(":", 1)[1]
        try:
            ids = [int(x) for x in body.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"source {spec!r}: book ids must be integers, e.g. gutenberg:1342,84") from None
        if any(i <= 0 for i in ids):
            raise ValueError(f"source {spec!r}: book ids must be positive")
        kw = {k: v for k, v in kw.items() if v is not None}
        return cls(ids, **kw)

    def _path(self, book_id: int) -> Path:
        return self.cache_dir / f"pg{book_id}.txt"

    def fetch(self) -> dict[int, str]:
        """Download every id missing from the cache; return `failed` (id -> reason). Idempotent."""
        if self._fetched:
            return self.failed
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.failed = {}
        for book_id in self.ids:
            path = self._path(book_id)
            if path.is_file():
                continue
            url = book_url(self.mirror, book_id)
            try:
                data = download(url, retries=self.retries, backoff=self.backoff, timeout=self.timeout)
                decode_text(data, url)  # refuse to cache binary / non-UTF-8 payloads
            except (*_NET_ERRORS, ValueError) as e:
                self.failed[book_id] = _describe(e) if not isinstance(e, ValueError) else str(e)
                continue
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a cache file is always complete
        self._fetched = True
        if self.failed:
            msg = "; ".join(f"{i}: {why}" for i, why in self.failed.items())
            if len(self.failed) == len(self.ids):
                raise ValueError(f"gutenberg: could not get any book from {self.mirror} ({msg})")
            print(f"gutenberg: could not get {len(self.failed)} of {len(self.ids)} books ({msg})", file=sys.stderr)
        return self.failed

    def _available(self) -> list[int]:
        self.fetch()
        return [i for i in self.ids if i not in self.failed]

    def doc_ids(self) -> list[str]:
        return [f"pg{i}" for i in self._available()]

    def documents(self) -> Iterator[Document]:
        for i in self._available():
            path = self._path(i)
            yield Document(f"pg{i}", strip_gutenberg(decode_text(path.read_bytes(), str(path))))

    def fingerprint(self) -> str:
        # Content hashes of the cached books, so a book that failed before and arrives now changes it.
        h = hashlib.sha256()
        books = {i: hashlib.sha256(self._path(i).read_bytes()).hexdigest() for i in self._available()}
        h.update(json.dumps(["gutenberg", books, sorted(self.failed)], sort_keys=True).encode())
        return h.hexdigest()

    def info(self) -> dict:
        return {"mirror": self.mirror, "failed": {str(k): v for k, v in self.failed.items()}}
