"""Throughput and peak memory of ``textrnn preprocess`` for the char and byte tokenizers.

Runs the real command line in a child process, once per corpus and tokenizer, and reports
MB/s (input bytes, 1 MB = 10^6 bytes, over the wall time of the whole command, start-up
included), the child's CPU time (user + system; steadier than wall time when other processes
share the CPUs) and its peak resident memory (``ru_maxrss``, both from ``os.wait4``). The corpora
are a generated one of ``--size-mb`` (default 256 MB: Shakespeare's lines shuffled, with one line
in twenty in other scripts, so every 4 MiB chunk holds accents, CJK and emoji) and
``../shared/data/tinyshakespeare.txt``. Everything is written in a temporary directory that is
deleted afterwards. Targets from issue 2: at least 30 MB/s and under 300 MB peak RSS.

    .venv/bin/python bench/preprocess.py [--size-mb 256] [--kinds char byte] [--tmp-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"
TARGET_MB_PER_S = 30.0
TARGET_RSS_MB = 300.0
TARGET_MIN_MB = 200.0  # below this, interpreter start-up dominates the time
BLOCK_BYTES = 4 << 20  # the generator writes shuffled blocks of this size

# one line in twenty comes from here: two- to four-byte UTF-8, combining marks, emoji
MULTIBYTE_LINES = [
    "Größe, naïve café, façade — “quoted” ‘text’ … and œuvre.",
    "日本語のテキストと漢字、ひらがな、カタカナ。",
    "Ελληνικά: Σωκράτης και Πλάτων στην Αθήνα.",
    "Русский текст: Война и мир, Лев Толстой.",
    "Emoji 😀🚀🎭 and flags 🇫🇷🇯🇵, joiners 👩‍💻.",
    "Combining: e\u0301 a\u0308 n\u0303, and العربية مرحبا.",
]


def generate_corpus(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Write at least ``size_bytes`` of text to ``path``; returns the size written."""
    if TINY_SHAKESPEARE.is_file():
        lines = TINY_SHAKESPEARE.read_text(encoding="utf-8").splitlines()
    else:  # a stand-in with the same flavour
        lines = [f"ROMEO {n}: to be, or not to be, that is the question" for n in range(40_000)]
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "wb") as handle:
        while written < size_bytes:
            picks = rng.integers(0, len(lines), 60_000)
            block = [lines[i] if rng.random() >= 0.05 else MULTIBYTE_LINES[i % len(MULTIBYTE_LINES)]
                     for i in picks]
            data = ("\n".join(block) + "\n").encode("utf-8")[:BLOCK_BYTES]
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            handle.write(data)
            written += len(data)
    return written


def run_preprocess(corpus: Path, out: Path, kind: str) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS in MB, output) of ``textrnn preprocess CORPUS --out OUT --tokenizer KIND``.

    The output goes to files, not pipes, so that ``os.wait4`` (not ``communicate``) reaps the
    child and hands back its own resource usage.
    """
    command = [sys.executable, "-m", "textrnn", "preprocess", str(corpus), "--out", str(out), "--tokenizer", kind]
    log = out.with_name(out.name + ".log")
    with open(log, "w+b") as output:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode("utf-8", "replace").strip()
    log.unlink()
    if child.returncode != 0:
        raise RuntimeError(f"preprocess failed (exit {child.returncode}): {text}")
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return seconds, cpu_seconds, usage.ru_maxrss * 1024 / 1e6, text  # ru_maxrss is in KiB on Linux


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, "
            f"numpy {np.__version__}; {platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=256, help="size of the generated corpus (MB)")
    parser.add_argument("--kinds", nargs="+", default=["char", "byte"], choices=["char", "byte", "bpe", "unigram"])
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where to write the corpus and outputs")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    if args.tmp_dir is not None:
        Path(args.tmp_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="textrnn-bench-", dir=args.tmp_dir) as tmp:
        tmp = Path(tmp)
        generated = tmp / "generated.txt"
        start = time.perf_counter()
        size = generate_corpus(generated, int(args.size_mb * 1e6))
        print(f"generated {size / 1e6:.0f} MB corpus in {time.perf_counter() - start:.1f}s")
        corpora = [("generated", generated)]
        if TINY_SHAKESPEARE.is_file():
            corpora.append(("tinyshakespeare", TINY_SHAKESPEARE))
        else:
            print(f"note: {TINY_SHAKESPEARE} not found; skipping it")

        print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
        print(f"{'corpus':<16} {'MB':>8} {'tokenizer':<9} {'seconds':>8} {'CPU s':>6} {'MB/s':>7} {'peak RSS MB':>11}  targets")
        for name, corpus in corpora:
            corpus_mb = corpus.stat().st_size / 1e6
            for kind in args.kinds:
                out = tmp / f"out-{name}-{kind}"
                seconds, cpu_seconds, peak_mb, summary = run_preprocess(corpus, out, kind)
                rate = corpus_mb / seconds
                if corpus_mb < TARGET_MIN_MB:
                    verdict = "start-up bound (targets apply to large corpora)"
                elif rate >= TARGET_MB_PER_S and peak_mb < TARGET_RSS_MB:
                    verdict = "ok"
                else:
                    verdict = f"MISSED (>= {TARGET_MB_PER_S:.0f} MB/s, < {TARGET_RSS_MB:.0f} MB)"
                print(f"{name:<16} {corpus_mb:>8.1f} {kind:<9} {seconds:>8.2f} {cpu_seconds:>6.2f} {rate:>7.1f} "
                      f"{peak_mb:>11.0f}  {verdict}")
                print(f"  {summary}")
                for file in out.iterdir():  # keep the temporary disk use to one output at a time
                    file.unlink()
                out.rmdir()


if __name__ == "__main__":
    main()
