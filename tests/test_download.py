"""Tests for textrnn.datasets: downloads from a local HTTP server, never the internet.

Each test registers a small corpus made here (its sha256 computed from the bytes) and
serves it from a threaded ``http.server`` on 127.0.0.1 that counts its requests.
"""

from __future__ import annotations

import hashlib
import os
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from textrnn import datasets
from textrnn.datasets import DATASETS, Dataset, default_cache_dir, download
from textrnn.errors import DatasetError

CORPUS = b"".join(b"line %d: to be, or not to be\n" % number for number in range(5_000))


@dataclass
class LocalServer:
    """A local HTTP server: ``files`` maps a path to the bytes served there."""

    base_url: str
    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)
    delay_seconds: float = 0.0

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    monkeypatch.setenv("no_proxy", "*")  # a proxy in the environment must not see 127.0.0.1
    state = LocalServer(base_url="", files={"/corpus.txt": CORPUS})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if state.delay_seconds:
                time.sleep(state.delay_seconds)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except ConnectionError:
                pass  # the client hung up early (timeout and oversize tests): expected

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output quiet

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval makes shutdown() return at once instead of after 0.5 s.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def corpus_entry(monkeypatch: pytest.MonkeyPatch, server: LocalServer) -> Dataset:
    """Replace the registry with one entry for CORPUS, served by ``server``."""
    entry = Dataset(
        name="tiny",
        url=server.url("/corpus.txt"),
        filename="tiny.txt",
        size=len(CORPUS),
        sha256=hashlib.sha256(CORPUS).hexdigest(),
        description="a test corpus",
    )
    monkeypatch.setattr(datasets, "DATASETS", {entry.name: entry})
    return entry


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_download_saves_verified_file_and_returns_path(
    corpus_entry: Dataset, tmp_path: Path
) -> None:
    calls: list[tuple[int, int]] = []
    path = download("tiny", tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert path == tmp_path / "tiny.txt"
    assert path.read_bytes() == CORPUS
    assert _leftovers(tmp_path) == ["tiny.txt"]  # no .part file left
    assert calls[-1] == (len(CORPUS), len(CORPUS))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_second_download_reuses_the_file(
    corpus_entry: Dataset, server: LocalServer, tmp_path: Path
) -> None:
    first = download("tiny", tmp_path)
    second = download("tiny", tmp_path)
    assert first == second
    assert server.requests == ["/corpus.txt"]


def test_damaged_file_is_downloaded_again(
    corpus_entry: Dataset, server: LocalServer, tmp_path: Path
) -> None:
    damaged = bytearray(CORPUS)
    damaged[10] ^= 0xFF  # same size, different bytes
    (tmp_path / "tiny.txt").write_bytes(bytes(damaged))
    path = download("tiny", tmp_path)
    assert path.read_bytes() == CORPUS
    assert len(server.requests) == 1


def test_checksum_mismatch_raises_and_leaves_nothing(
    corpus_entry: Dataset, server: LocalServer, tmp_path: Path
) -> None:
    server.files["/corpus.txt"] = CORPUS[:-1] + b"!"
    with pytest.raises(DatasetError) as raised:
        download("tiny", tmp_path)
    message = str(raised.value)
    assert corpus_entry.sha256 in message
    assert hashlib.sha256(server.files["/corpus.txt"]).hexdigest() in message
    assert "deleted" in message
    assert _leftovers(tmp_path) == []


def test_oversized_response_is_cut_off(
    corpus_entry: Dataset, server: LocalServer, tmp_path: Path
) -> None:
    server.files["/corpus.txt"] = CORPUS * 3
    with pytest.raises(DatasetError, match="more than"):
        download("tiny", tmp_path)
    assert _leftovers(tmp_path) == []


def test_unknown_name_lists_known_names(corpus_entry: Dataset, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*tiny"):
        download("nope", tmp_path)
    assert _leftovers(tmp_path) == []


def test_http_404_raises_dataset_error(
    corpus_entry: Dataset, server: LocalServer, tmp_path: Path
) -> None:
    missing_url = server.url("/missing.txt")
    with pytest.raises(DatasetError, match="404") as raised:
        download("tiny", tmp_path, url=missing_url)
    assert missing_url in str(raised.value)
    assert _leftovers(tmp_path) == []


def test_url_overrides_registry(corpus_entry: Dataset, server: LocalServer, tmp_path: Path) -> None:
    server.files["/mirror/tiny.txt"] = CORPUS
    download("tiny", tmp_path, url=server.url("/mirror/tiny.txt"))
    assert server.requests == ["/mirror/tiny.txt"]


def test_timeout_raises_dataset_error(
    corpus_entry: Dataset, server: LocalServer, tmp_path: Path
) -> None:
    server.delay_seconds = 1.0
    with pytest.raises(DatasetError, match="cannot download") as raised:
        download("tiny", tmp_path, timeout=0.2)
    assert corpus_entry.url in str(raised.value)
    assert _leftovers(tmp_path) == []


def test_refused_connection_raises_dataset_error(corpus_entry: Dataset, tmp_path: Path) -> None:
    # Bind a port, then close it, so nothing listens there.
    probe = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()
    with pytest.raises(DatasetError, match=f"127.0.0.1:{port}"):
        download("tiny", tmp_path, url=f"http://127.0.0.1:{port}/corpus.txt", timeout=2)
    assert _leftovers(tmp_path) == []


def test_malformed_url_raises_dataset_error(corpus_entry: Dataset, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a url"):
        download("tiny", tmp_path, url="not a url")
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_saved_file_mode_follows_umask(corpus_entry: Dataset, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = download("tiny", tmp_path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_unwritable_directory_is_named(corpus_entry: Dataset, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    directory = blocker / "corpora"
    with pytest.raises(DatasetError, match="cannot write to directory") as raised:
        download("tiny", directory)
    assert str(directory) in str(raised.value)


def test_default_cache_dir_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TEXTRNN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TEXTRNN_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "textrnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "textrnn"


def test_download_without_directory_uses_cache_dir(
    corpus_entry: Dataset, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TEXTRNN_CACHE", str(tmp_path / "cache"))
    assert download("tiny") == tmp_path / "cache" / "tiny.txt"


def test_registry_entries_are_well_formed() -> None:
    shakespeare = DATASETS["tinyshakespeare"]
    assert shakespeare.size == 1_115_394
    assert shakespeare.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    for name, entry in DATASETS.items():
        assert entry.name == name
        assert entry.url.startswith("https://")
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert "/" not in entry.filename and not entry.filename.startswith(".")
