"""Fixtures shared by the test files: seeding, running the real CLI, and small corpora.

``run_cli`` runs ``python -m textrnn`` in a subprocess, so a test sees exactly what a user sees:
the exit code, stdout and stderr (a traceback included, if one escaped). ``invoke`` runs the same
command line in this process (no torch import per case). ``seed`` seeds Python, numpy and torch
through the package's one seeding helper. Every test runs torch on one thread.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str | os.PathLike, cwd: str | os.PathLike | None = None,
            input: str | bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m textrnn ARGS...`` and return the finished process (text stdout/stderr).

    ``input`` goes to standard input (str is encoded as UTF-8). The child gets no terminal, so
    no progress bars, and it imports this checkout's ``textrnn`` whatever ``cwd`` is.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("TEXTRNN_PROGRESS", None)
    data = input.encode("utf-8") if isinstance(input, str) else input
    done = subprocess.run([sys.executable, "-m", "textrnn", *map(str, args)], cwd=cwd, input=data,
                          capture_output=True, env=env, timeout=300)
    return subprocess.CompletedProcess(done.args, done.returncode,
                                       done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


class Result(NamedTuple):
    code: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _working_directory(path: Path | None):
    previous = Path.cwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def invoke(*args: str | os.PathLike, cwd: Path | None = None, stdin: bytes = b"") -> Result:
    """``textrnn ARGS...`` run in this process through ``textrnn.cli.app``: exit code, stdout, stderr.

    Any exception other than SystemExit propagates and fails the test: it would be a traceback.
    """
    from textrnn.cli import app

    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    with _working_directory(cwd), mock.patch.object(sys, "stdin", fake_stdin), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app([os.fspath(a) for a in args], prog_name="textrnn")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread, here and in child processes: on a small shared machine tiny models
    train several times faster than with threads fighting over the cores."""
    previous_env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    if previous_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous_env


@pytest.fixture
def seed() -> int:
    """Seed Python, numpy and torch with 0 (imports torch only for the tests that ask for it)."""
    from textrnn.runtime import set_seed

    set_seed(0)
    return 0


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A small UTF-8 text file (about 6 kB) with multibyte characters, tabs and blank lines."""
    lines = [f"line {n}: to be, or not to be \u2014 na\u00efve caf\u00e9\tend\n" for n in range(100)]
    path = tmp_path / "tiny.txt"
    path.write_text("".join(lines) + "\n\u65e5\u672c\u8a9e \U0001F600\n", encoding="utf-8")
    return path


def sentence_corpus(sentences: tuple[str, ...], chars: int, seed: int = 0) -> str:
    """A small learnable text: ``sentences`` in a random order (not one loop), cut to ``chars``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, size = [], 0
    while size < chars:
        parts.append(sentences[rng.integers(len(sentences))])
        size += len(parts[-1])
    return "".join(parts)[:chars]
