"""The web export's files: textrnn.js, index.html, and the onnxruntime-web runtime they run on.

``textrnn export RUN --format web`` writes the step graph and tokenizer (``export.py``) and
these beside them. The runtime is onnxruntime-web, pinned (``ORT_WEB_VERSION``): its ES module
(``ort.wasm.bundle.min.mjs``, the CPU/wasm build only) and its wasm binary, 14 MB, which go into
the export's ``ort/`` folder so that the page loads nothing from elsewhere. They come from:

1. ``$TEXTRNN_WEB_RUNTIME``, a folder that holds them (``node_modules/onnxruntime-web/dist`` of
   an ``npm install onnxruntime-web@1.30.0``, for instance);
2. else the cache, ``$TEXTRNN_CACHE/onnxruntime-web-1.30.0`` (``~/.cache/textrnn`` by default),
   which the first web export fills from the npm registry's tarball, checked against its pinned
   sha512 (``make`` fills it too; ``python -m textrnn.web`` does only that).

``--runtime cdn`` writes no runtime: the page imports the same pinned version from jsDelivr.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import threading
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import ConfigError, InputError

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_TARBALL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{ORT_WEB_VERSION}.tgz"
ORT_WEB_INTEGRITY = "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
ORT_MODULE = "ort.wasm.bundle.min.mjs"  # the wasm (CPU) build, its JavaScript glue bundled in
RUNTIME_FILES = (ORT_MODULE, "ort-wasm-simd-threaded.wasm")
RUNTIME_DIR = "ort"  # in the export
PAGE_FILES = ("textrnn.js", "index.html")
RUNTIMES = ("bundled", "cdn")
_HERE = Path(__file__).parent
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".html": "text/html"}


def runtime_cache() -> Path:
    """Where the pinned onnxruntime-web files are kept: ``$TEXTRNN_CACHE/onnxruntime-web-<version>``."""
    from ..datasets import default_cache_dir

    return default_cache_dir() / f"onnxruntime-web-{ORT_WEB_VERSION}"


def _has_runtime(directory: Path) -> bool:
    return all((directory / name).is_file() for name in RUNTIME_FILES)


def find_runtime(download: bool = True, timeout: float = 60) -> Path:
    """The folder with the onnxruntime-web files: ``$TEXTRNN_WEB_RUNTIME``, else the cache (filled if empty)."""
    explicit = os.environ.get("TEXTRNN_WEB_RUNTIME")
    if explicit:
        folder = Path(explicit).expanduser()
        if not _has_runtime(folder):
            raise InputError(f"{folder} (TEXTRNN_WEB_RUNTIME): does not hold {' and '.join(RUNTIME_FILES)} "
                             f"of onnxruntime-web {ORT_WEB_VERSION}")
        return folder
    cache = runtime_cache()
    if _has_runtime(cache):
        return cache
    if not download:
        raise InputError(f"{cache}: no onnxruntime-web {ORT_WEB_VERSION} here; run `python -m textrnn.web`")
    return fetch_runtime(cache, timeout=timeout)


def fetch_runtime(cache: Path | None = None, url: str = ORT_WEB_TARBALL, timeout: float = 60) -> Path:
    """Download the pinned onnxruntime-web tarball, check its sha512 and unpack its runtime files into ``cache``."""
    cache = runtime_cache() if cache is None else Path(cache)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"cannot download onnxruntime-web {ORT_WEB_VERSION} from {url} ({reason}); "
                         f"set TEXTRNN_WEB_RUNTIME to a folder with {' and '.join(RUNTIME_FILES)}, "
                         f"or export with --runtime cdn") from None
    expected = ORT_WEB_INTEGRITY.removeprefix("sha512-")
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != expected:
        raise InputError(f"{url}: the download does not match onnxruntime-web {ORT_WEB_VERSION}'s pinned sha512")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for name in RUNTIME_FILES:  # named members only, read as bytes: nothing is extracted by path
            member = archive.extractfile(f"package/dist/{name}")
            if member is None:
                raise InputError(f"{url}: the tarball has no dist/{name}")
            files[name] = member.read()
    from ..fileio import staging_directory

    with staging_directory(cache) as tmp:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
    return cache


def check_tokenizer(kind: str) -> None:
    """Refuse a tokenizer that textrnn.js cannot run (SentencePiece's bpe and unigram)."""
    if kind not in ("char", "byte"):
        raise ConfigError(f"the web export carries char and byte tokenizers, not {kind} "
                          f"(SentencePiece has no JavaScript port that matches it exactly); "
                          f"use --format onnx, or train with --tokenizer char or byte")


def web_metadata(runtime: str) -> dict:
    """The ``web`` entry of the export's config.json: where textrnn.js finds onnxruntime-web."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    module = f"{RUNTIME_DIR}/{ORT_MODULE}" if runtime == "bundled" else ORT_WEB_CDN + ORT_MODULE
    return {"runtime": module, "onnxruntime_web": ORT_WEB_VERSION}


def write_page(directory: Path, runtime: str) -> None:
    """Copy textrnn.js and index.html into ``directory``, and the runtime files unless it comes from the CDN."""
    for name in PAGE_FILES:
        shutil.copyfile(_HERE / name, directory / name)
    # Node reads textrnn.js as the ES module it is, whatever package.json sits above the folder
    (directory / "package.json").write_text(json.dumps({"private": True, "type": "module", "main": "textrnn.js"},
                                                       indent=1) + "\n", encoding="utf-8")
    if runtime == "bundled":
        source = find_runtime()
        (directory / RUNTIME_DIR).mkdir()
        for name in RUNTIME_FILES:
            shutil.copyfile(source / name, directory / RUNTIME_DIR / name)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def static_server(directory: str | os.PathLike):
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread, as any static file
    server would (the tests and ``bench/web_speed.py`` open an export this way); yields its URL."""
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
