"""File helpers: atomic writes, fsync, safe reads and hashing. The lowest module of the package.

Every file textrnn writes goes through ``atomic_write_bytes`` or ``staging_directory``: written to
a temporary name in the same directory, flushed, fsynced and renamed, so readers see the old file
or the new one, never a part. What the files mean is left to ``checkpoint.py`` and the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CheckpointError, write_error

TMP_PREFIX = ".tmp-"
_CHUNK_BYTES = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # temporary files are private; the renamed result follows the umask


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort, since not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as exc:
        raise write_error(path.parent, exc, "cannot write here") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (after symlinks). A FIFO, device or directory is refused, not read:
    a hostile run directory could point model.safetensors at /dev/zero or a pipe that never ends."""
    path = Path(path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    with open(path, "rb") as handle:
        return handle.read()


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(read_regular_file(path).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; is this a textrnn {what}?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


@contextmanager
def staging_directory(final: Path) -> Iterator[Path]:
    """A temporary sibling directory that becomes ``final`` only if the block completes."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    except OSError as exc:
        raise write_error(final.parent, exc, "cannot create a directory here") from None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_directory(tmp)
        if final.exists():
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_directory(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(final, exc) from None
        raise


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files a killed process left behind (they are never read as checkpoints)."""
    for child in Path(directory).glob(TMP_PREFIX + "*"):
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()
