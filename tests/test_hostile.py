"""Hostile checkpoints: a run directory from a stranger may fail to load, but never runs its code.

Loading never unpickles: tensors come from safetensors, everything else from JSON (and a
SentencePiece protobuf). To prove it, a pickle payload whose ``__reduce__`` would create a
sentinel file is planted in every file that ``generate`` and ``train --resume`` read -- the list
is checked against an audit hook that records every file they open -- and each must end in a
clean one-line error (or, for the metrics log, in going on) with the sentinel never created.
Damaged weights, shapes, dtypes, vocabularies and format versions each get a clear error that
names the file.

Commands run in this process through ``textrnn.cli.app`` (see ``invoke``); copies of two tiny
runs (char and bpe) are damaged, never the originals.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import sys
from pathlib import Path

import pytest

from conftest import invoke
import torch

from textrnn import checkpoint as ckpt

TRAIN = dict(seq_len=16, batch_size=4, max_steps=4, eval_every=4, warmup_steps=0, device="cpu")


# ---------------------------------------------------------------- running the CLI in this process

def assert_clean_error(outcome: tuple[int, str, str], *words: str) -> str:
    code, stdout, stderr = outcome
    lines = stderr.splitlines()
    assert code == 2, f"exit {code}; stderr:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{stderr}"
    for word in words:
        assert word in lines[0], f"{word!r} is not in {lines[0]!r}"
    assert stdout == ""
    return lines[0]


# ---------------------------------------------------------------- runs to damage

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny trained runs, ``char`` and ``bpe`` (a SentencePiece model, vocabulary 300)."""
    from textrnn.config import ModelConfig, TrainConfig
    from textrnn.training import train

    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {n}: the quick brown fox jumps over the lazy dog.\n" for n in range(150)),
                      encoding="utf-8")
    made = {}
    for kind in ("char", "bpe"):
        made[kind] = root / kind
        train([corpus], made[kind], ModelConfig(num_layers=1, hidden_size=16, embedding_dim=8, dropout=0.0),
              TrainConfig(**TRAIN), tokenizer=kind, vocab_size=300 if kind == "bpe" else None)
    return made


def copy_run(source: Path, destination: Path) -> Path:
    """A copy of a run; it resumes from its own copy of the data (named relative to the run)."""
    shutil.copytree(source, destination)
    assert json.loads((destination / "config.json").read_text(encoding="utf-8"))["data"]["path"] == "data"
    return destination


def generate(run: Path) -> tuple[int, str, str]:
    return invoke("generate", "--checkpoint", run, "--length", "5", "--seed", "1", "--prompt", "")


def resume(run: Path) -> tuple[int, str, str]:
    return invoke("train", "--resume", run)  # already at max_steps: loads everything, trains nothing


COMMANDS = {"generate": generate, "resume": resume}


# ---------------------------------------------------------------- the payload

def payload(sentinel: Path, form: str) -> bytes:
    """Bytes that create ``sentinel`` when unpickled: a raw pickle, or a ``torch.save`` archive."""

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    if form == "pickle":
        return pickle.dumps(Payload(), protocol=pickle.HIGHEST_PROTOCOL)
    buffer = io.BytesIO()
    torch.save({"embedding.weight": Payload()}, buffer)
    return buffer.getvalue()


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The planted bytes really would run code if a loader unpickled them."""
    sentinel = tmp_path / "ran"
    pickle.loads(payload(sentinel, "pickle"))
    assert sentinel.exists()
    sentinel.unlink()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(payload(sentinel, "torch.save"))) as archive:  # what torch.load unpickles
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    assert sentinel.exists()


# Every file each command reads, relative to the run directory. A change to the loader that reads
# another file fails test_these_are_all_the_files_the_loader_reads until the file is added here.
READS = {
    ("generate", "char"): ["config.json", "tokenizer.json", "model.safetensors"],
    ("resume", "char"): ["config.json", "data/meta.json", "data/tokenizer.json", "data/train.bin", "data/val.bin",
                         "last/state.json", "last/model.safetensors", "last/optimizer.safetensors",
                         "last/state.safetensors", "metrics.jsonl", "samples.jsonl"],
}
READS[("generate", "bpe")] = READS[("generate", "char")] + ["tokenizer.model"]
READS[("resume", "bpe")] = READS[("resume", "char")] + ["data/tokenizer.model"]


class _OpenRecorder:
    """An audit hook (installed once; hooks cannot be removed) that records files opened for reading."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.opened: set[str] = set()
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if self.root is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = os.path.abspath(os.fsdecode(args[0])), args[1], args[2]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
            flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        relative = os.path.relpath(path, self.root)
        if not writing and not relative.startswith("..") and ".tmp-" not in relative and os.path.isfile(path):
            self.opened.add(relative)

    @contextlib.contextmanager
    def recording(self, root: Path):
        self.root, self.opened = str(root.resolve()), set()
        try:
            yield self.opened
        finally:
            self.root = None


_recorder: _OpenRecorder | None = None


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("command", ["generate", "resume"])
def test_these_are_all_the_files_the_loader_reads(tmp_path: Path, runs, command: str, kind: str) -> None:
    global _recorder
    _recorder = _recorder or _OpenRecorder()
    run = copy_run(runs[kind], tmp_path / "run")
    with _recorder.recording(run) as opened:
        code, _, stderr = COMMANDS[command](run)
    assert code == 0, stderr
    assert sorted(opened) == sorted(READS[(command, kind)])


PLANTED = [(command, kind, name, form)
           for (command, kind), names in READS.items() for name in names
           for form in (["pickle", "torch.save"] if name.endswith(".safetensors") else ["pickle"])]


@pytest.mark.parametrize("command, kind, name, form", PLANTED, ids=["-".join(case) for case in PLANTED])
def test_a_pickle_payload_is_never_unpickled(tmp_path: Path, runs, command: str, kind: str, name: str,
                                             form: str) -> None:
    run = copy_run(runs[kind], tmp_path / "run")
    sentinel = tmp_path / "payload-ran"
    (run / name).write_bytes(payload(sentinel, form))
    outcome = COMMANDS[command](run)
    assert not sentinel.exists(), f"loading {name} unpickled the payload"
    if name.endswith(".jsonl"):  # a log, not state: damaged lines are dropped and the run goes on
        assert outcome[0] == 0, outcome[2]
    else:
        assert_clean_error(outcome, Path(name).name)


# ---------------------------------------------------------------- damaged weights

def _rewrite_tensors(path: Path, change) -> None:
    tensors = ckpt.load_tensors(path)
    change(tensors)
    ckpt.save_tensors(path, tensors)


def _nan_weights(t: dict) -> None:
    t["embedding.weight"][0, 0] = float("nan")


DAMAGE = [
    # id, what to do to the weights file, words the message must hold
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), []),
    ("zero-bytes", lambda p: p.write_bytes(b""), ["empty"]),
    ("random-bytes", lambda p: p.write_bytes(bytes((i * 97 + 13) % 256 for i in range(4096))), []),
    ("header-claims-an-exabyte", lambda p: p.write_bytes(struct.pack("<Q", 2**60) + b"{}"), []),
    ("offsets-past-the-end", lambda p: p.write_bytes(_header({"embedding.weight": {
        "dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}) + b"\0" * 16), []),
    ("json-header-not-an-object", lambda p: p.write_bytes(_header([1, 2, 3])), []),
    ("wrong-shape", lambda p: _rewrite_tensors(p, lambda t: t.update({"embedding.weight": torch.zeros(3, 8)})),
     ["embedding.weight", "shape"]),
    ("wrong-dtype", lambda p: _rewrite_tensors(p, lambda t: t.update(
        {"embedding.weight": t["embedding.weight"].double()})), ["embedding.weight", "float64"]),
    ("integer-dtype", lambda p: _rewrite_tensors(p, lambda t: t.update(
        {"head.bias": t["head.bias"].long()})), ["head.bias", "int64"]),
    ("missing-tensor", lambda p: _rewrite_tensors(p, lambda t: t.pop("head.bias")), ["head.bias"]),
    ("unexpected-tensor", lambda p: _rewrite_tensors(p, lambda t: t.update({"evil": torch.zeros(1)})), ["evil"]),
    ("nan-weights", lambda p: _rewrite_tensors(p, _nan_weights), ["NaN"]),
    ("a-directory", lambda p: (p.unlink(), p.mkdir()), ["regular file"]),
    # a FIFO (or a device: /dev/zero is not tested, as a regression would fill memory) is refused unread
    ("a-link-to-a-fifo", lambda p: (p.unlink(), os.mkfifo(p.with_name("fifo")), p.symlink_to(p.with_name("fifo"))),
     ["regular file"]),
]


def _header(header) -> bytes:
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data)) + data


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO blocks its reader forever)."""

    def expire(signum, frame):
        raise TimeoutError(f"still loading after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("command, name", [("generate", "model.safetensors"), ("resume", "last/model.safetensors")],
                         ids=["generate", "resume"])
@pytest.mark.parametrize("damage, words", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_weights_get_a_clear_error(tmp_path: Path, runs, command: str, name: str, damage,
                                           words: list[str]) -> None:
    run = copy_run(runs["char"], tmp_path / "run")
    damage(run / name)
    with _deadline(30):
        line = assert_clean_error(COMMANDS[command](run), "model.safetensors", *words)
    assert len(line) < 500


# ---------------------------------------------------------------- configs that do not fit

def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


MISFITS = [
    # id, file, change, commands it affects, words the message must hold
    ("vocab-size-mismatch", "config.json", lambda c: c["model"].update(vocab_size=c["model"]["vocab_size"] + 1),
     ["generate"], ["vocab"]),
    ("tokenizer-lost-a-character", "tokenizer.json", lambda t: t.update(chars=t["chars"][1:]),
     ["generate"], ["vocab"]),
    ("newer-run-format", "config.json", lambda c: c.update(version=2), ["generate", "resume"],
     ["config.json", "newer"]),
    ("not-a-run", "config.json", lambda c: c.update(format="something-else"), ["generate", "resume"],
     ["config.json", "something-else"]),
    ("version-not-a-number", "config.json", lambda c: c.update(version="1"), ["generate", "resume"], ["version"]),
    ("model-section-missing", "config.json", lambda c: c.pop("model"), ["generate", "resume"], ["model"]),
    ("unknown-model-setting", "config.json", lambda c: c["model"].update(exec="rm -rf /"), ["generate", "resume"],
     ["exec"]),
    ("wrong-type-in-model", "config.json", lambda c: c["model"].update(hidden_size="16"), ["generate", "resume"],
     ["hidden_size"]),
    ("huge-model-in-config", "config.json", lambda c: c["model"].update(hidden_size=10**6), ["generate"],
     ["shape"]),
    ("newer-tokenizer-format", "tokenizer.json", lambda t: t.update(version=2), ["generate"], ["tokenizer.json"]),
    ("unknown-tokenizer-kind", "tokenizer.json", lambda t: t.update(kind="pickle"), ["generate"], ["pickle"]),
    ("newer-state-format", "last/state.json", lambda s: s.update(version=2), ["resume"], ["state.json", "newer"]),
    ("state-step-not-a-number", "last/state.json", lambda s: s.update(step="4"), ["resume"], ["state.json", "step"]),
    ("newer-data-format", "data/meta.json", lambda m: m.update(version=2), ["resume"], ["meta.json", "newer"]),
    ("data-dtype-unknown", "data/meta.json", lambda m: m.update(dtype="object"), ["resume"], ["meta.json", "dtype"]),
]
MISFIT_CASES = [(case[0], command, *case[1:3], case[4]) for case in MISFITS for command in case[3]]


@pytest.mark.parametrize("command, name, change, words", [c[1:] for c in MISFIT_CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in MISFIT_CASES])
def test_a_config_that_does_not_fit_gets_a_clear_error(tmp_path: Path, runs, command: str, name: str, change,
                                                       words: list[str]) -> None:
    run = copy_run(runs["char"], tmp_path / "run")
    _edit_json(run / name, change)
    assert_clean_error(COMMANDS[command](run), *words)


def test_resume_with_a_huge_model_in_config_is_a_clean_out_of_memory(tmp_path: Path, runs) -> None:
    run = copy_run(runs["char"], tmp_path / "run")
    _edit_json(run / "config.json", lambda c: c["model"].update(hidden_size=10**6))  # 16 TB of weights
    code, stdout, stderr = resume(run)
    assert code == 1 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert "memory" in stderr


def test_a_damaged_sentencepiece_model_names_the_file(tmp_path: Path, runs) -> None:
    run = copy_run(runs["bpe"], tmp_path / "run")
    model = run / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:100])
    assert_clean_error(generate(run), "tokenizer.model")


def test_a_crash_between_the_renames_of_last_resumes_from_last_old(tmp_path: Path, runs) -> None:
    """``last/`` is replaced by two renames; a crash between them leaves only ``last.old/``."""
    run = copy_run(runs["char"], tmp_path / "run")
    (run / "last").rename(run / "last.old")
    code, _, stderr = invoke("train", "--resume", run, "--max-steps", "5")
    assert code == 0, stderr
    assert json.loads((run / "last" / "state.json").read_text(encoding="utf-8"))["step"] == 5
