"""Bad input through the real command line: every case ends in a clean refusal or a sane result.

A refusal is exit code 2 and exactly one stderr line, ``error: <what>: <problem>``, naming the
input, with no traceback, nothing on stdout and nothing half-written left behind. For some
inputs going on is right (exit 0); those cases check the result instead, e.g. that odd line
separators survive a round trip.

Cases run ``textrnn.cli.app`` -- the object behind the ``textrnn`` script and ``python -m
textrnn`` -- inside this process, so that some sixty cases take seconds on a small machine; an
exception other than SystemExit fails the test, as it would have printed a traceback.
``test_real_process_*`` repeat the contract in real subprocesses, including the unreadable and
unwritable paths, which need a process without root's file-access override.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import Result, invoke, run_cli

TINY_MODEL = ["--layers", "1", "--hidden", "16", "--embed", "8", "--dropout", "0", "--batch-size", "4",
              "--seq-len", "16", "--warmup", "0", "--device", "cpu"]
TINY_TRAIN = [*TINY_MODEL, "--max-steps", "4", "--eval-every", "4"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly quacks".split()


def corpus_text(lines: int = 120, seed: int = 0) -> str:
    """Plain lowercase text (letters, spaces, newlines, commas): about 6 kB for 120 lines."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(8)) + ",\n" for _ in range(lines))


# ---------------------------------------------------------------- running the CLI

def assert_refused(result: Result | subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """Exit ``code``; stderr is one line ``error: ...`` holding every word; nothing on stdout."""
    stderr = result.stderr
    returncode = result.code if isinstance(result, Result) else result.returncode
    assert returncode == code, f"exit {returncode}, expected {code}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{stderr}"
    for word in words:
        assert word in lines[0], f"{word!r} is not in {lines[0]!r}"
    assert result.stdout == "", f"a refusal wrote to stdout: {result.stdout!r}"
    return lines[0]


def assert_ok(result: Result) -> Result:
    assert result.code == 0, f"exit {result.code}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def assert_nothing_left(out: Path) -> None:
    """A refused command leaves no output directory and no temporary file beside it."""
    assert not out.exists(), f"{out} was left behind: {sorted(p.name for p in out.iterdir())}"
    assert not list(out.parent.glob(".tmp-*")), "a temporary file was left behind"


def round_trip(data_dir: Path) -> str:
    """The text a preprocess directory holds, decoded back from its train and val ids."""
    from textrnn.data import load_dataset

    dataset = load_dataset(data_dir)
    ids = np.concatenate([dataset.split("train"), dataset.split("val")]).tolist()
    return dataset.tokenizer.decode(ids)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus: Path) -> Path:
    """One tiny trained run (seq_len 16), shared by every generate case."""
    from textrnn.config import ModelConfig, TrainConfig
    from textrnn.training import train

    out = tmp_path_factory.mktemp("run") / "run"
    train([corpus], out, ModelConfig(num_layers=1, hidden_size=16, embedding_dim=8, dropout=0.0),
          TrainConfig(seq_len=16, batch_size=4, max_steps=4, eval_every=4, warmup_steps=0, device="cpu"))
    return out


# ---------------------------------------------------------------- corpora that must be refused

def _cut_euro() -> tuple[bytes, int]:
    head = "caf\u00e9 au lait\n".encode() * 30
    return head + "\u20ac".encode()[:2], len(head)


_CUT, _CUT_AT = _cut_euro()
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000100000001008060000001ff3ff61") + bytes(range(256))

REFUSED_CORPORA = [
    # id, file contents, words the message must hold
    ("empty-file", b"", ["empty"]),
    ("bom-only", b"\xef\xbb\xbf", ["empty"]),
    ("stray-0xff-byte", b"good text\n" * 20 + b"bad \xff byte\n", ["invalid UTF-8", "byte 204"]),
    ("multibyte-cut-at-eof", _CUT, ["invalid UTF-8", f"byte {_CUT_AT}"]),
    ("utf16-with-bom", "hello world\n".encode("utf-16") * 20, ["UTF-16"]),
    ("utf16-without-bom", "hello world\n".encode("utf-16-le") * 20, ["UTF-16"]),
    ("utf32-with-bom", "hello world\n".encode("utf-32"), ["UTF-32"]),
    ("nul-bytes", b"some text\n" * 5 + b"a\x00b\n" * 5, ["NUL", "offset 51"]),
    ("binary-png", PNG, ["binary"]),
    ("binary-without-nul", bytes(range(0x80, 0x100)) * 8, ["invalid UTF-8", "byte 0"]),
]


@pytest.mark.parametrize("contents, words", [c[1:] for c in REFUSED_CORPORA], ids=[c[0] for c in REFUSED_CORPORA])
def test_preprocess_refuses_a_bad_corpus(tmp_path: Path, contents: bytes, words: list[str]) -> None:
    source = tmp_path / "input.txt"
    source.write_bytes(contents)
    out = tmp_path / "data"
    assert_refused(invoke("preprocess", source, "--out", out), "input.txt", *words)
    assert_nothing_left(out)


@pytest.mark.parametrize("contents, words", [c[1:] for c in REFUSED_CORPORA], ids=[c[0] for c in REFUSED_CORPORA])
def test_train_refuses_a_bad_corpus_and_leaves_no_run(tmp_path: Path, contents: bytes, words: list[str]) -> None:
    source = tmp_path / "input.txt"
    source.write_bytes(contents)
    run = tmp_path / "run"
    assert_refused(invoke("train", source, "--out", run, *TINY_TRAIN), "input.txt", *words)
    assert_nothing_left(run)


def test_train_refuses_a_corpus_shorter_than_one_batch_and_leaves_no_run(tmp_path: Path) -> None:
    source = tmp_path / "short.txt"
    source.write_text("hello world\nthis is short\n" * 2, encoding="utf-8")
    run = tmp_path / "run"
    assert_refused(invoke("train", source, "--out", run, *TINY_TRAIN), "too short", "batch")
    assert_nothing_left(run)
    # a later attempt with settings that fit is not blocked by a half-made run directory
    assert_ok(invoke("train", source, "--out", run, *TINY_MODEL, "--batch-size", "1", "--seq-len", "8",
                     "--max-steps", "2", "--eval-every", "2", "--val-fraction", "0.2"))


@pytest.mark.parametrize("fraction", ["0.001", "0", "1", "1.5", "nan"])
def test_a_val_fraction_that_leaves_no_val_batch_is_refused(tmp_path: Path, fraction: str) -> None:
    source = tmp_path / "small.txt"
    source.write_text("just a few words of text\n" * 12, encoding="utf-8")  # 300 characters
    out = tmp_path / "data"
    assert_refused(invoke("preprocess", source, "--out", out, "--val-fraction", fraction), "val")
    assert_nothing_left(out)


def test_sentencepiece_vocab_too_small_for_the_corpus_is_refused(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "data"
    assert_refused(invoke("preprocess", corpus, "--out", out, "--tokenizer", "bpe", "--vocab-size", "20"),
                   "vocab size")
    assert_nothing_left(out)


# ---------------------------------------------------------------- corpora where going on is right

def test_lone_cr_and_mixed_line_endings_round_trip(tmp_path: Path) -> None:
    text = "dos line\r\nold mac line\runix line\n\rcr first\r\r\nend\r" * 20
    source = tmp_path / "mixed.txt"
    source.write_bytes(text.encode())
    assert_ok(invoke("preprocess", source, "--out", tmp_path / "data"))
    assert round_trip(tmp_path / "data") == text.replace("\r\n", "\n")  # lone CRs are text, kept as they are
    assert_ok(invoke("preprocess", source, "--out", tmp_path / "kept", "--keep-crlf"))
    assert round_trip(tmp_path / "kept") == text


@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe"])
def test_unicode_line_separators_survive_a_round_trip(tmp_path: Path, tokenizer: str) -> None:
    # str.splitlines() would cut at every one of these; the corpus must come back whole
    text = "one\u2028two\x85three\x1cfour\x1dfive\x1esix\u2029seven\x0beight\x0cnine\n" * 40
    source = tmp_path / "separators.txt"
    source.write_text(text, encoding="utf-8")
    extra = ["--vocab-size", "300"] if tokenizer == "bpe" else []
    assert_ok(invoke("preprocess", source, "--out", tmp_path / "data", "--tokenizer", tokenizer, *extra))
    assert round_trip(tmp_path / "data") == text


@pytest.mark.parametrize("tokenizer", ["bpe", "unigram"])
def test_a_line_longer_than_10000_bytes_works_with_sentencepiece(tmp_path: Path, tokenizer: str) -> None:
    rng = random.Random(1)
    long_line = " ".join(rng.choice(WORDS) for _ in range(3000))  # about 15 kB, no newline
    text = long_line + "\n" + corpus_text(20)
    source = tmp_path / "long.txt"
    source.write_text(text, encoding="utf-8")
    assert_ok(invoke("preprocess", source, "--out", tmp_path / "data", "--tokenizer", tokenizer,
                     "--vocab-size", "300"))
    assert round_trip(tmp_path / "data") == text


def test_sentencepiece_vocab_larger_than_the_corpus_supports_is_lowered_with_a_warning(tmp_path: Path) -> None:
    source = tmp_path / "small.txt"
    source.write_text(corpus_text(30), encoding="utf-8")
    result = assert_ok(invoke("preprocess", source, "--out", tmp_path / "data", "--tokenizer", "bpe",
                              "--vocab-size", "100000"))
    assert "100000" in result.stderr and "warning" in result.stderr.lower()
    from textrnn.data import load_dataset

    assert load_dataset(tmp_path / "data").tokenizer.vocab_size < 100000


def test_a_stray_byte_is_read_with_errors_replace(tmp_path: Path) -> None:
    source = tmp_path / "input.txt"
    source.write_bytes(b"good text\n" * 20 + b"bad \xff byte\n")
    assert_ok(invoke("preprocess", source, "--out", tmp_path / "data", "--errors", "replace"))
    assert round_trip(tmp_path / "data") == "good text\n" * 20 + "bad \ufffd byte\n"


def test_a_single_unique_character_trains_and_generates(tmp_path: Path) -> None:
    source = tmp_path / "one.txt"
    source.write_text("a" * 400, encoding="utf-8")
    run = tmp_path / "run"
    assert_ok(invoke("train", source, "--out", run, *TINY_TRAIN))
    result = assert_ok(invoke("generate", "--checkpoint", run, "--length", "30", "--seed", "1"))
    assert result.stdout == "a" * 30 + "\n"


# ---------------------------------------------------------------- generate: refused settings and prompts

REFUSED_GENERATE = [
    # id, arguments, words the message must hold
    ("temperature-negative", ["--temperature", "-0.5"], ["temperature"]),
    ("temperature-nan", ["--temperature", "nan"], ["temperature"]),
    ("temperature-inf", ["--temperature", "inf"], ["temperature"]),
    ("top-k-negative", ["--top-k", "-1"], ["top_k"]),
    ("top-p-zero", ["--top-p", "0"], ["top_p"]),
    ("top-p-above-one", ["--top-p", "1.5"], ["top_p"]),
    ("top-p-nan", ["--top-p", "nan"], ["top_p"]),
    ("length-negative", ["--length", "-1"], ["length"]),
    ("length-a-billion", ["--length", "1000000000"], ["length", "limit"]),
    ("length-not-a-number", ["--length", "ten"], ["length"]),
    ("num-samples-zero", ["--num-samples", "0"], ["num-samples"]),
    ("empty-stop-string", ["--stop", ""], ["stop"]),
    ("unseen-prompt-characters", ["--prompt", "\u03a9mega \U0001f600"], ["prompt", "\u03a9"]),
    ("unknown-option", ["--temprature", "0.5"], ["--temprature"]),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in REFUSED_GENERATE], ids=[c[0] for c in REFUSED_GENERATE])
def test_generate_refuses_bad_settings(run_dir: Path, args: list[str], words: list[str]) -> None:
    assert_refused(invoke("generate", "--checkpoint", run_dir, "--seed", "1", *args), *words)


def test_generate_refuses_unreadable_prompts(tmp_path: Path, run_dir: Path) -> None:
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"the \xff fox")
    assert_refused(invoke("generate", "-c", run_dir, "--prompt-file", bad), "prompt.txt", "UTF-8")
    assert_refused(invoke("generate", "-c", run_dir, "--prompt", "-", stdin=b"the \xff fox"), "stdin", "UTF-8")
    assert_refused(invoke("generate", "-c", run_dir, "--prompt-file", tmp_path / "missing.txt"), "missing.txt")
    assert_refused(invoke("generate", "-c", run_dir, "--prompt-file", tmp_path), str(tmp_path), "directory")
    assert_refused(invoke("generate", "-c", run_dir, "--prompt", "a", "--prompt-file", bad), "prompt")


# ---------------------------------------------------------------- generate: settings where going on is right

def _generate(run_dir: Path, *args: str) -> str:
    return assert_ok(invoke("generate", "--checkpoint", run_dir, "--length", "40", *args)).stdout


def test_temperature_zero_is_greedy(run_dir: Path) -> None:
    first = _generate(run_dir, "--temperature", "0", "--seed", "1", "--prompt", "the ")
    assert first == _generate(run_dir, "--temperature", "0", "--seed", "2", "--prompt", "the ")
    assert first.startswith("the ") and len(first) == len("the ") + 40 + 1


@pytest.mark.parametrize("filters", [["--top-k", "0"], ["--top-k", "100000"], ["--top-p", "1.0"]],
                         ids=["top-k-zero", "top-k-larger-than-vocab", "top-p-one"])
def test_switched_off_filters_sample_like_no_filter(run_dir: Path, filters: list[str]) -> None:
    assert _generate(run_dir, "--seed", "3", *filters) == _generate(run_dir, "--seed", "3")


def test_a_vanishing_top_p_keeps_the_top_token(run_dir: Path) -> None:
    # 1e-50 is 0 in float32: the nucleus still holds the most likely token, so this is greedy
    assert _generate(run_dir, "--top-p", "1e-50", "--seed", "3") == _generate(run_dir, "--temperature", "0")


def test_length_zero_prints_only_the_prompt(run_dir: Path) -> None:
    assert _generate(run_dir, "--length", "0", "--prompt", "the fox") == "the fox\n"


def test_an_empty_prompt_samples_from_scratch(run_dir: Path) -> None:
    text = _generate(run_dir, "--prompt", "", "--seed", "4")
    assert len(text) == 41


def test_a_prompt_longer_than_the_training_window_is_read_whole(run_dir: Path) -> None:
    prompt = corpus_text(5, seed=9)  # about 250 characters; the model was trained on windows of 16
    text = _generate(run_dir, "--prompt", prompt, "--seed", "5")
    assert text.startswith(prompt) and len(text) == len(prompt) + 41


def test_unseen_prompt_characters_can_be_skipped_with_a_warning(run_dir: Path) -> None:
    result = assert_ok(invoke("generate", "-c", run_dir, "--prompt", "the \u03a9 fox", "--unknown", "skip",
                              "--length", "5", "--seed", "1"))
    assert "\u03a9" in result.stderr and "warning" in result.stderr


# ---------------------------------------------------------------- train: configs and options

TOML_CASES = [  # (flags win over the file, so these use settings that TINY_TRAIN does not pass)
    # id, config file contents, words the message must hold
    ("malformed-toml", "[model\nhidden_size = 16\n", ["config.toml", "TOML"]),
    ("unknown-key", "[train]\nlearning_rate = 0.1\n", ["config.toml", "learning_rate"]),
    ("wrong-type", "[train]\nlog_every = \"often\"\n", ["config.toml", "log_every"]),
    ("wrong-type-int-for-bool", "[model]\ntie_weights = 3\n", ["config.toml", "tie_weights"]),
    ("out-of-range", "[train]\nlr = -1.0\n", ["lr"]),
    ("unknown-decay", "[train]\ndecay = \"step\"\n", ["decay", "cosine", "linear"]),
    ("weight-drop-out-of-range", "[model]\nweight_drop = 1.0\n", ["weight_drop"]),
    ("ema-out-of-range", "[train]\nema = 1.0\n", ["ema"]),
    ("unreadable-duration", "[train]\nmax_time = \"soon\"\n", ["config.toml", "duration"]),
    ("preset-not-a-name", "preset = 3\n", ["config.toml", "preset"]),
    ("not-utf8", b"[train]\nseed = 1 # \xff\n", ["config.toml"]),
]


@pytest.mark.parametrize("contents, words", [c[1:] for c in TOML_CASES], ids=[c[0] for c in TOML_CASES])
def test_train_refuses_a_bad_config_file(tmp_path: Path, corpus: Path, contents, words: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    run = tmp_path / "run"
    assert_refused(invoke("train", corpus, "--out", run, "--config", config, *TINY_TRAIN), *words)
    assert_nothing_left(run)


OPTION_CASES = [
    ("max-time-unreadable", ["--max-time", "10x"], ["10x"]),
    ("max-time-negative", ["--max-time", "-5"], ["duration"]),
    ("batch-size-zero", ["--batch-size", "0"], ["batch_size"]),
    ("dropout-one", ["--dropout", "1.0"], ["dropout"]),
    ("lr-nan", ["--lr", "nan"], ["lr"]),
    ("clip-negative", ["--clip", "-1"], ["clip"]),
    ("unknown-preset", ["--preset", "huge"], ["huge"]),
    ("unknown-cell", ["--cell", "transformer"], ["transformer"]),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_train_refuses_bad_options(tmp_path: Path, corpus: Path, args: list[str], words: list[str]) -> None:
    run = tmp_path / "run"
    assert_refused(invoke("train", corpus, "--out", run, *TINY_TRAIN, *args), *words)
    assert_nothing_left(run)


def test_resume_refusals(tmp_path: Path, corpus: Path, run_dir: Path) -> None:
    assert_refused(invoke("train", "--resume", tmp_path / "nowhere"), "nowhere")
    assert_refused(invoke("train", "--resume", corpus), "corpus.txt")
    assert_refused(invoke("train", corpus, "--resume", run_dir), "--resume")
    assert_refused(invoke("train", "--resume", run_dir, "--lr", "1"), "lr")
    assert_refused(invoke("train", corpus, "--out", run_dir, *TINY_TRAIN), str(run_dir), "--resume")
    assert_refused(invoke("train"), "INPUT")


# ---------------------------------------------------------------- paths

def test_missing_paths_are_named(tmp_path: Path, corpus: Path, run_dir: Path) -> None:
    missing = tmp_path / "no such file.txt"
    assert_refused(invoke("preprocess", missing, "--out", tmp_path / "data"), "no such file.txt")
    assert_refused(invoke("train", missing, "--out", tmp_path / "run", *TINY_TRAIN), "no such file.txt")
    assert_refused(invoke("train", corpus, "--out", tmp_path / "run",
                          "--config", missing, *TINY_TRAIN), "no such file.txt")
    assert_refused(invoke("generate", "--checkpoint", tmp_path / "no run"), "no run")
    assert_refused(invoke("evaluate", run_dir, missing), "no such file.txt")
    assert_refused(invoke("evaluate", tmp_path / "no run", missing), "no run")
    assert_refused(invoke("info", tmp_path / "no run"), "no run")
    assert_refused(invoke("generate", cwd=tmp_path), "runs")  # no --checkpoint and no ./runs
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_a_directory_where_a_file_is_expected(tmp_path: Path, corpus: Path, run_dir: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_refused(invoke("evaluate", run_dir, folder), "folder", "directory")
    assert_refused(invoke("train", corpus, "--out", tmp_path / "run", "--config", folder, *TINY_TRAIN),
                   "folder", "directory")
    assert_refused(invoke("preprocess", folder, "--out", tmp_path / "data"), "folder", "no text files")
    (folder / "image.png").write_bytes(PNG)  # binary files in a directory are skipped, and said so
    assert_refused(invoke("preprocess", folder, "--out", tmp_path / "data"), "folder", "binary")


def test_a_file_where_a_directory_is_expected(tmp_path: Path, corpus: Path) -> None:
    assert_refused(invoke("generate", "--checkpoint", corpus), "corpus.txt")
    assert_refused(invoke("info", corpus), "corpus.txt")
    assert_refused(invoke("preprocess", corpus, "--out", corpus), "corpus.txt", "not a directory")
    assert_refused(invoke("train", corpus, "--out", corpus, *TINY_TRAIN), "corpus.txt", "not a directory")
    assert_refused(invoke("preprocess", corpus, "--out", corpus / "data"), "corpus.txt")
    assert corpus.read_text(encoding="utf-8") == corpus_text()  # never overwritten


def test_empty_file_to_evaluate(tmp_path: Path, run_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_refused(invoke("evaluate", run_dir, empty), "empty.txt", "empty")


def test_paths_with_spaces_and_non_ascii_characters_work(tmp_path: Path) -> None:
    folder = tmp_path / "my d\u00f6cs \u65e5\u672c"
    folder.mkdir()
    source = folder / "c\u00f6rpus file.txt"
    source.write_text(corpus_text(), encoding="utf-8")
    run = folder / "r\u00fcn 1"
    data = folder / "d\u00e4ta dir"
    assert_ok(invoke("preprocess", source, "--out", data))
    assert_ok(invoke("train", data, "--out", run, *TINY_TRAIN))
    prompt = folder / "pr\u00f6mpt.txt"
    prompt.write_text("the fox", encoding="utf-8")
    generated = assert_ok(invoke("generate", "-c", run, "--prompt-file", prompt, "--length", "5")).stdout
    assert generated.startswith("the fox")
    assert "bits/char" in assert_ok(invoke("evaluate", run, source)).stdout
    assert_ok(invoke("info", run))


# ---------------------------------------------------------------- the same contract in real processes

def test_real_process_refusals_print_one_line_and_no_traceback(tmp_path: Path, run_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_refused(run_cli("preprocess", empty, "--out", tmp_path / "data"), "empty.txt", "empty")
    assert_nothing_left(tmp_path / "data")
    # the default, streaming generate: a refusal comes before any text
    assert_refused(run_cli("generate", "-c", run_dir, "--length", "1000000000", "--prompt", "the"), "length")


_DROP_FILE_ACCESS_OVERRIDE = r"""
import ctypes, os, sys
if os.geteuid() == 0:  # root reads and writes anything: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        sys.exit(77)
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & ~0b110)
    if libc.capset(ctypes.byref(header), data) != 0:
        sys.exit(77)
from textrnn.cli import app
app(sys.argv[1:], prog_name="textrnn")
"""


def _run_without_file_access_override(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", _DROP_FILE_ACCESS_OVERRIDE, *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode == 77:
        pytest.skip("cannot drop root's file-access capabilities here")
    return done


def test_real_process_unreadable_input(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(corpus_text(), encoding="utf-8")
    secret.chmod(0)
    try:
        done = _run_without_file_access_override("preprocess", secret, "--out", tmp_path / "data")
    finally:
        secret.chmod(0o644)
    assert_refused(done, "secret.txt", "read")
    assert_nothing_left(tmp_path / "data")


def test_real_process_unwritable_output_directory(tmp_path: Path, corpus: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = _run_without_file_access_override("preprocess", corpus, "--out", locked / "data")
    finally:
        locked.chmod(0o755)
    assert_refused(done, "locked")
    assert list(locked.iterdir()) == []
