"""Gutenberg downloader against a local HTTP server on 127.0.0.1 (no network)."""

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from latentformer.data.gutenberg import GutenbergSource, strip_gutenberg
from latentformer.data.prepare import prepare


def _book(title, body):
    return (
        f"\ufeffThe Project Gutenberg eBook of {title}\r\n\r\nThis eBook is for the use of anyone anywhere...\r\n\r\n"
        f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n\r\n{body}\r\n\r\n"
        f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\r\n\r\nSection 1. General Terms of Use (licence)\r\n"
    )


BOOKS = {
    11: _book("Alice", "Alice was beginning to get very tired."),
    84: _book("Frankenstein", "You will rejoice to hear that no disaster has accompanied."),
    1342: _book("Pride and Prejudice", "It is a truth universally acknowledged."),
}
FLAKY = {84: 1, 1342: 2}  # id -> number of 503s before success
DROP = {11: 1}  # id -> number of connections closed without a response before success


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    hits = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            book_id = int(self.path.rsplit("/pg", 1)[-1].removesuffix(".txt")) if "/pg" in self.path else -1
            if book_id in DROP and hits[self.path] <= DROP[book_id]:
                self.close_connection = True  # client sees RemoteDisconnected: transient
                return
            if book_id in FLAKY and hits[self.path] <= FLAKY[book_id]:
                self.send_error(503)
                return
            if book_id not in BOOKS:
                self.send_error(404)
                return
            data = BOOKS[book_id].encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_strip_header_footer():
    text = strip_gutenberg(BOOKS[11])
    assert text == "Alice was beginning to get very tired.\n"


def test_download_retry_cache_and_failures(server, tmp_path, capsys):
    mirror, hits = server
    src = GutenbergSource([11, 84, 1342, 999], mirror=mirror, cache_dir=tmp_path / "cache", backoff=0.01)
    docs = {d.id: d.text for d in src.documents()}
    assert docs == {f"pg{i}": strip_gutenberg(BOOKS[i]) for i in (11, 84, 1342)}
    assert all("PROJECT GUTENBERG" not in t and "licence" not in t for t in docs.values())
    assert src.failed == {999: "HTTP 404"}
    assert "could not get 1 of 4 books (999: HTTP 404)" in capsys.readouterr().err
    assert hits["/cache/epub/84/pg84.txt"] == 2 and hits["/cache/epub/1342/pg1342.txt"] == 3  # retried 503s
    assert hits["/cache/epub/11/pg11.txt"] == 2  # retried a dropped connection
    assert hits["/cache/epub/999/pg999.txt"] == 1  # 404 is not retried
    # second source over the same cache: no request for cached books
    before = sum(hits.values())
    again = GutenbergSource([11, 84, 1342], mirror=mirror, cache_dir=tmp_path / "cache", backoff=0.01)
    assert {d.id: d.text for d in again.documents()} == docs
    assert sum(hits.values()) == before


def test_retries_exhausted_reported(server, tmp_path):
    mirror, hits = server
    src = GutenbergSource([84, 1342], mirror=mirror, cache_dir=tmp_path, retries=1, backoff=0.01)
    assert src.doc_ids() == ["pg84"] and src.failed == {1342: "HTTP 503"}


def test_all_failed_is_error(server, tmp_path):
    mirror, _ = server
    src = GutenbergSource([5, 6], mirror=mirror, cache_dir=tmp_path, backoff=0.01)
    with pytest.raises(ValueError, match="could not get any book.*5: HTTP 404; 6: HTTP 404"):
        src.doc_ids()


def test_prepare_gutenberg_via_env_mirror_and_cache(server, tmp_path, monkeypatch):
    mirror, hits = server
    monkeypatch.setenv("LATENTFORMER_GUTENBERG_MIRROR", mirror + "/cache/epub/{id}/pg{id}.txt")
    monkeypatch.setenv("LATENTFORMER_CACHE", str(tmp_path / "lfcache"))
    meta = prepare("gutenberg:11,84,1342,999", "byte", tmp_path / "out", progress=False, val_docs=1)
    assert meta["source"]["failed"] == {"999": "HTTP 404"}
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3
    assert (tmp_path / "lfcache" / "gutenberg" / "pg11.txt").is_file()
    # re-run: the cache answers and the output is up to date (only the failed id is retried)
    before = Counter(hits)
    assert prepare("gutenberg:11,84,1342,999", "byte", tmp_path / "out", progress=False, val_docs=1) == meta
    new = Counter(hits) - before
    assert set(new) == {"/cache/epub/999/pg999.txt"}


def test_bad_spec():
    from latentformer.data.sources import open_source

    with pytest.raises(ValueError, match="must be integers"):
        open_source("gutenberg:12,abc")
    with pytest.raises(ValueError, match="no book ids"):
        open_source("gutenberg:")
