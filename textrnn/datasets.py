"""The named corpora textrnn can fetch, and a checked, atomic download of one of them.

Standard library only (urllib, hashlib); no torch. Reading and tokenizing the text is
left to ``textrnn.data``; the ``download`` command in ``textrnn.cli`` calls ``download``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import DatasetError
from .fileio import file_sha256, fsync_directory

_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class Dataset:
    """One downloadable corpus, pinned by its size and sha256."""

    name: str  # the name users type: `textrnn download NAME`
    url: str  # where it is fetched from
    filename: str  # the file name it is saved under
    size: int  # length of the file in bytes
    sha256: str  # hex digest of the whole file
    description: str  # one line for listings and help


DATASETS: dict[str, Dataset] = {
    dataset.name: dataset
    for dataset in (
        Dataset(
            name="tinyshakespeare",
            url=(
                "https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                "data/tinyshakespeare/input.txt"
            ),
            filename="tinyshakespeare.txt",
            size=1_115_394,
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            description=(
                "Tiny Shakespeare from karpathy/char-rnn: 40,000 lines of the plays, "
                "ASCII, 65 distinct characters"
            ),
        ),
    )
}


def default_cache_dir() -> Path:
    """Where downloads go when no directory is given.

    ``$TEXTRNN_CACHE`` if set, else ``$XDG_CACHE_HOME/textrnn``, else ``~/.cache/textrnn``.
    """
    if explicit := os.environ.get("TEXTRNN_CACHE"):
        return Path(explicit).expanduser()
    if xdg_cache := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg_cache).expanduser() / "textrnn"
    return Path.home() / ".cache" / "textrnn"


def download(
    name: str,
    directory: Path | None = None,
    *,
    url: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 30,
) -> Path:
    """Fetch the dataset ``name`` into ``directory`` and return the path of the verified file.

    A file already there with the right sha256 is returned without touching the network.
    Otherwise the bytes stream into a hidden ``.part`` file beside the target, hashed on the
    way, and are renamed into place only once the sha256 matches, so the target is never
    partial. ``url`` replaces the registry's URL (a mirror, or a local server in tests);
    ``progress(bytes_done, bytes_total)`` is called after each chunk; ``timeout`` is in
    seconds per network operation. Every failure raises ``DatasetError``.
    """
    dataset = _lookup(name)
    directory = default_cache_dir() if directory is None else Path(directory).expanduser()
    source = dataset.url if url is None else url
    target = directory / dataset.filename
    if _is_intact(target, dataset):
        return target

    # A unique hidden name beside the target, so the final rename is atomic. Not mkstemp:
    # its 0600 mode would survive the rename, where os.open's 0o666 follows the umask.
    temp_path = directory / f".{dataset.filename}.{uuid.uuid4().hex[:12]}.part"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        descriptor = os.open(temp_path, flags, 0o666)
    except OSError as error:
        raise DatasetError(
            f"cannot write to directory {directory}: {error.strerror or error}"
        ) from error

    try:
        with os.fdopen(descriptor, "wb") as temp_file:
            digest = _stream(source, temp_file, dataset, progress, timeout)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        if digest != dataset.sha256:
            raise DatasetError(
                f"checksum mismatch for {dataset.name} from {source}: expected sha256 "
                f"{dataset.sha256}, got {digest}; the download was deleted"
            )
        os.replace(temp_path, target)
        fsync_directory(directory)
    except OSError as error:
        raise DatasetError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        # Any failure (including Ctrl-C) leaves no partial file behind.
        temp_path.unlink(missing_ok=True)
    return target


def _lookup(name: str) -> Dataset:
    """The registry entry for ``name``, or an error listing the names there are."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS)) or "(none)"
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}") from None


def _is_intact(path: Path, dataset: Dataset) -> bool:
    """Whether ``path`` already holds exactly the dataset's bytes (size first, as it is cheap)."""
    try:
        if not path.is_file() or path.stat().st_size != dataset.size:
            return False
        return file_sha256(path) == dataset.sha256
    except OSError:
        return False


def _stream(
    source: str,
    sink: BinaryIO,
    dataset: Dataset,
    progress: Callable[[int, int], None] | None,
    timeout: float,
) -> str:
    """Copy ``source`` into the open binary file ``sink`` and return the sha256 of what came.

    Network failures become a ``DatasetError`` naming the URL; a write failure is left as
    the ``OSError`` it is, for the caller to name the file.
    """
    hasher = hashlib.sha256()
    done = 0
    try:
        request = urllib.request.Request(source, headers={"User-Agent": "textrnn"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = _content_length(response) or dataset.size
            while chunk := response.read(_CHUNK_BYTES):
                done += len(chunk)
                if done > dataset.size:
                    # Not our file; stop before a wrong URL fills the disk.
                    raise DatasetError(
                        f"{source} sent more than the {dataset.size} bytes expected for "
                        f"{dataset.name}; the download was deleted"
                    )
                hasher.update(chunk)
                sink.write(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as error:
        raise DatasetError(
            f"cannot download {source}: HTTP {error.code} {error.reason}"
        ) from error
    except urllib.error.URLError as error:
        raise DatasetError(f"cannot download {source}: {error.reason}") from error
    except TimeoutError as error:
        raise DatasetError(
            f"cannot download {source}: timed out after {timeout:g} s"
        ) from error
    except (ConnectionError, http.client.HTTPException) as error:
        raise DatasetError(
            f"cannot download {source}: connection failed ({error!r})"
        ) from error
    except ValueError as error:  # a malformed URL, e.g. no scheme
        raise DatasetError(f"cannot download {source}: {error}") from error
    return hasher.hexdigest()


def _content_length(response: http.client.HTTPResponse) -> int | None:
    """The response's Content-Length as an int, or None when absent or malformed."""
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, TypeError, ValueError):
        return None
