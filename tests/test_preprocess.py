"""Tests for reading text and ``preprocess`` (textrnn.data) and for ``textrnn preprocess`` itself.

Reading is checked property-based against Python's one-shot decoder at tiny chunk sizes, so
chunk boundaries fall everywhere: inside a UTF-8 sequence, a BOM, a CRLF. Every bad input goes
through the real command line and must give exit code 2 and one ``error:`` line, no traceback.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from textrnn import data
from textrnn.data import (FILE_SEPARATOR, iter_corpus, load_dataset, preprocess, read_chunks, resolve_inputs,
                          smallest_dtype)
from textrnn.errors import ConfigError, InputError
from textrnn.tokenizers import CharTokenizer, load_tokenizer

TEXT_A = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\tAll:  Speak, speak.\n" * 8
TEXT_B = "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 e\u0301\u2028x\x85y\x1cz\r lone CR\n" * 8


def _ids(out) -> np.ndarray:
    """train.bin then val.bin, read back through numpy.memmap as a training run would."""
    dataset = load_dataset(out)
    train, val = dataset.split("train"), dataset.split("val")
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)
    return np.concatenate([train, val])


def _decoded(out) -> str:
    return load_tokenizer(out).decode(_ids(out).tolist())


# ---------------------------------------------------------------- reading

# pieces of a file: ASCII, CR/LF, a BOM, valid multibyte sequences, and broken ones
_PIECES = [b"a", b" ", b"\r", b"\n", b"\r\n", codecs.BOM_UTF8, "\u20ac".encode(), "\U0001F600".encode(),
           b"\xe2", b"\x82", b"\xff", b"\xf0\x9f", b"\xc3", b"\xa9", b"\xed\xa0\x80"]


def _expected(raw: bytes, errors: str) -> str:
    return raw.decode("utf-8", errors).removeprefix("\ufeff").replace("\r\n", "\n")


@given(st.lists(st.sampled_from(_PIECES), max_size=25).map(b"".join), st.integers(1, 9))
@settings(max_examples=300, deadline=None)
def test_read_chunks_matches_one_shot_decoding_at_any_chunk_size(tmp_path_factory, raw, chunk_bytes):
    path = tmp_path_factory.mktemp("read") / "text.txt"
    path.write_bytes(raw)
    for errors in ("strict", "replace"):
        try:
            expected = _expected(raw, errors)
        except UnicodeDecodeError as exc:
            with pytest.raises(InputError, match=rf"invalid UTF-8 at byte {exc.start};"):
                "".join(read_chunks(path, errors, chunk_bytes=chunk_bytes))
        else:
            assert "".join(read_chunks(path, errors, chunk_bytes=chunk_bytes)) == expected
    kept = raw.decode("utf-8", "replace").removeprefix("\ufeff")
    assert "".join(read_chunks(path, "replace", newline="keep", chunk_bytes=chunk_bytes)) == kept


def test_invalid_utf8_offset_in_a_later_default_sized_chunk(tmp_path):
    path = tmp_path / "big.txt"
    bad_at = data.CHUNK_BYTES + 12_345
    raw = b"x" * (data.CHUNK_BYTES - 1) + "\u20ac".encode() + b"y" * (bad_at - data.CHUNK_BYTES - 2) + b"\xc3(ok"
    assert raw.index(b"\xc3(") == bad_at
    path.write_bytes(raw)
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: invalid UTF-8 at byte {bad_at};"):
        for _ in read_chunks(path):
            pass


def test_truncated_sequence_at_the_end_is_reported_where_it_starts(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"abcdef" + "\U0001F600".encode()[:3])
    for chunk_bytes in (1, 2, 4, 7, 100):
        with pytest.raises(InputError, match="invalid UTF-8 at byte 6;"):
            list(read_chunks(path, chunk_bytes=chunk_bytes))


def test_read_chunks_rejects_binary_and_utf16(tmp_path):
    cases = {
        "nul.bin": (b"text then \x00 a NUL", "binary file (NUL byte at offset 10)"),
        "late_nul.bin": (b"a" * 100 + b"\x00", "binary file (NUL byte at offset 100)"),
        "utf16le.txt": ("hello".encode("utf-16"), "looks like UTF-16 (byte-order mark)"),
        "utf16be.txt": (codecs.BOM_UTF16_BE + "hello".encode("utf-16-be"), "looks like UTF-16 (byte-order mark)"),
        "utf16_no_bom.txt": ("hello world".encode("utf-16-le"), "looks like UTF-16 (every other byte is NUL)"),
        "utf32.txt": ("hello".encode("utf-32"), "looks like UTF-32"),
    }
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / name}: {message}")):
            list(read_chunks(tmp_path / name, chunk_bytes=7))


def test_read_chunks_reports_raw_blocks(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"a\r\nb")
    blocks = []
    assert "".join(read_chunks(path, chunk_bytes=2, on_raw=blocks.append)) == "a\nb"
    assert b"".join(blocks) == path.read_bytes()


def test_resolve_inputs_walks_directories_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b_sub").mkdir(parents=True)
    (corpus / ".hidden_dir").mkdir()
    (corpus / "__pycache__").mkdir()
    for name in ["c.txt", "a.txt", "b_sub/z.txt", "b_sub/y.md", ".hidden.txt", ".hidden_dir/x.txt",
                 "__pycache__/m.pyc"]:
        (corpus / name).write_text(name)
    (corpus / "image.png").write_bytes(b"\x89PNG\x00\x00")
    warnings = []
    files = resolve_inputs([corpus, tmp_path / "corpus" / "c.txt"], warn=warnings.append)
    names = [f.relative_to(corpus).as_posix() for f in files]
    assert names == ["a.txt", "c.txt", "b_sub/y.md", "b_sub/z.txt", "c.txt"]
    assert warnings == [f"warning: {corpus}: skipped 1 binary file(s)"]


def test_iter_corpus_joins_files_with_the_separator(tmp_path):
    (tmp_path / "a").write_text("one")
    (tmp_path / "b").write_text("")
    (tmp_path / "c").write_text("three")
    text = "".join(iter_corpus([tmp_path / "a", tmp_path / "b", tmp_path / "c"]))
    assert text == "one" + FILE_SEPARATOR + FILE_SEPARATOR + "three"


def test_smallest_dtype():
    assert [smallest_dtype(n).name for n in (2, 256, 257, 65536, 65537, 2**32)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32", "uint32"]
    with pytest.raises(ConfigError):
        smallest_dtype(2**32 + 1)


# ---------------------------------------------------------------- preprocess

def test_preprocess_several_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT_A, encoding="utf-8")
    b.write_bytes(TEXT_B.encode("utf-8"))
    out = preprocess([a, b], tmp_path / "out", val_fraction=0.25)
    text = TEXT_A + FILE_SEPARATOR + TEXT_B

    tok = load_tokenizer(out)
    assert isinstance(tok, CharTokenizer) and tok.chars == sorted(set(text))
    ids = _ids(out)
    assert ids.dtype == np.uint8
    assert np.array_equal(ids, tok.encode_array(text))  # memmap read-back equals the encoding
    assert tok.decode(ids.tolist()) == text

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    for split in ("train", "val"):  # the full hash of each split, for `textrnn info --verify`
        assert meta["splits"][split].pop("sha256") == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
    val_chars = int(len(text) * 0.25)
    assert meta == {
        "format": "textrnn-data", "version": 1, "dtype": "uint8", "vocab_size": tok.vocab_size,
        "tokenizer": {"kind": "char", "vocab_size": tok.vocab_size, "chars": "".join(tok.chars)},
        "splits": {"train": {"tokens": len(text) - val_chars, "chars": len(text) - val_chars},
                   "val": {"tokens": val_chars, "chars": val_chars}},
        "sources": [{"path": str(f), "bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                    for f in (a, b)],
        "newline": "crlf->lf", "errors": "strict", "val_fraction": 0.25, "separator": FILE_SEPARATOR,
    }
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_preprocess_a_directory(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text(TEXT_B, encoding="utf-8")
    (corpus / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (corpus / "sub" / "c.txt").write_text("third file\n", encoding="utf-8")
    (corpus / "blob.bin").write_bytes(b"\x00\x01\x02")
    warnings = []
    out = preprocess([corpus], tmp_path / "out", tokenizer="byte", warn=warnings.append)
    text = TEXT_A + FILE_SEPARATOR + TEXT_B + FILE_SEPARATOR + "third file\n"
    ids = _ids(out)
    assert ids.dtype == np.uint8 and ids.tobytes() == text.encode("utf-8")
    assert _decoded(out) == text
    meta = load_dataset(out).meta
    assert [s["path"] for s in meta["sources"]] == [str(corpus / "a.txt"), str(corpus / "b.txt"),
                                                   str(corpus / "sub" / "c.txt")]
    assert meta["tokenizer"] == {"kind": "byte", "vocab_size": 256}
    assert meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"] == len(text)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == len(text.encode("utf-8"))
    assert warnings == [f"warning: {corpus}: skipped 1 binary file(s)"]


def test_preprocess_picks_the_smallest_dtype(tmp_path):
    path = tmp_path / "cjk.txt"
    path.write_text("".join(chr(0x4E00 + n) for n in range(400)) * 3, encoding="utf-8")
    out = preprocess([path], tmp_path / "out")
    meta = load_dataset(out).meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 401
    assert _ids(out).dtype == np.uint16 and _decoded(out) == path.read_bytes().decode("utf-8")


def test_preprocess_turns_crlf_into_lf_drops_the_bom_and_records_it(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"line one\r\nline two\r\n\r\nlone\rcr\r\n" * 4)
    out = preprocess([path], tmp_path / "out")
    assert _decoded(out) == "line one\nline two\n\nlone\rcr\n" * 4
    assert load_dataset(out).meta["newline"] == "crlf->lf"
    kept = preprocess([path], tmp_path / "kept", newline="keep")
    assert _decoded(kept) == "line one\r\nline two\r\n\r\nlone\rcr\r\n" * 4
    assert load_dataset(kept).meta["newline"] == "keep"


def test_preprocess_errors_replace_reads_invalid_utf8(tmp_path):
    raw = b"good text \xff\xfe and \xe2\x82 more good text\n" * 3
    path = tmp_path / "latin.txt"
    path.write_bytes(raw)
    with pytest.raises(InputError, match="invalid UTF-8 at byte 10"):
        preprocess([path], tmp_path / "out")
    out = preprocess([path], tmp_path / "out", errors="replace")
    assert _decoded(out) == raw.decode("utf-8", "replace")
    assert load_dataset(out).meta["errors"] == "replace"


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_preprocess_sentencepiece(tmp_path, kind):
    path = tmp_path / "a.txt"
    path.write_text(TEXT_A * 3 + TEXT_B * 3 + "  indented\n\t\ttabs  and   runs\n", encoding="utf-8")
    warnings = []
    out = preprocess([path], tmp_path / "out", tokenizer=kind, vocab_size=330, warn=warnings.append)
    tok = load_tokenizer(out)
    assert tok.kind == kind and load_dataset(out).meta["dtype"] == "uint16"
    assert _decoded(out) == path.read_bytes().decode("utf-8")
    ids = _ids(out)
    assert len(ids) < len(path.read_bytes().decode("utf-8"))


def test_sentence_aligned_chunks_keep_all_text(monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 40)
    chunks = ["abc def\nghi ", "jkl" * 5 + "\n", "x" * 50, " yy" * 20, "z"]
    pieces = list(data._sentence_aligned(iter(chunks), "bpe"))
    # after a newline; a long line without one whole, or just before its last space
    assert pieces == ["abc def\n", "ghi " + "jkl" * 5 + "\n", "x" * 50, " yy" * 19, " yyz"]
    assert list(data._sentence_aligned(iter(chunks), "char")) == chunks


def test_preprocess_warns_that_vocab_size_is_for_subwords(tmp_path, tiny_corpus):
    warnings = []
    preprocess([tiny_corpus], tmp_path / "out", vocab_size=500, warn=warnings.append)
    assert warnings and "--vocab-size applies to bpe and unigram" in warnings[0]


def test_a_failed_preprocess_leaves_no_directory(tmp_path, tiny_corpus, monkeypatch):
    def broken_save(self, directory):
        raise InputError("disk on fire")

    monkeypatch.setattr(CharTokenizer, "save", broken_save)
    with pytest.raises(InputError, match="disk on fire"):
        preprocess([tiny_corpus], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]  # no out/, no .tmp-*


def test_a_failed_preprocess_keeps_the_previous_output(tmp_path, tiny_corpus):
    out = preprocess([tiny_corpus], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 100 + b"\xff")
    with pytest.raises(InputError, match="invalid UTF-8 at byte 500"):
        preprocess([bad], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*"))
    again = preprocess([tiny_corpus], out, tokenizer="byte")  # a finished output is replaced
    assert load_dataset(again).tokenizer.kind == "byte"


def test_preprocess_refuses_to_replace_a_directory_it_did_not_make(tmp_path, tiny_corpus):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not empty and was not made by preprocess"):
        preprocess([tiny_corpus], precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (precious / "thesis.tex").unlink()
    preprocess([tiny_corpus], precious)  # an empty directory is fine


def test_preprocess_rejects_bad_settings(tmp_path, tiny_corpus):
    for kwargs, message in [({"tokenizer": "wordpiece"}, "unknown tokenizer kind"),
                            ({"errors": "ignore"}, "errors must be strict or replace"),
                            ({"newline": "cr"}, "newline must be lf or keep"),
                            ({"val_fraction": 1.0}, "val fraction must be between 0 and 1")]:
        with pytest.raises(ConfigError, match=message):
            preprocess([tiny_corpus], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the command line

def test_cli_preprocess_succeeds(tmp_path, tiny_corpus):
    second = tmp_path / "second.txt"
    second.write_text("second file\n", encoding="utf-8")
    result = run_cli("preprocess", tiny_corpus, second, "--out", tmp_path / "out", "--tokenizer", "char")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'out'))}: char tokenizer, vocab \d+, train [\d,]+ tokens, "
                        r"val [\d,]+ tokens \(uint8\)\n", result.stdout)
    assert _decoded(tmp_path / "out") == tiny_corpus.read_bytes().decode("utf-8") + FILE_SEPARATOR + "second file\n"


def _bad_inputs(tmp_path):
    """(name, files to create, preprocess arguments, what the one error line must contain)."""
    blocked = tmp_path / "a_file.txt"
    bad_byte = 6 + 3 * 1000  # after 'valid ' and a thousand three-byte euro signs
    return [
        ("missing file", {}, ["nope.txt"], "nope.txt: no such file or directory"),
        ("directory without text files", {"empty_dir/.hidden": b"x", "empty_dir/blob.bin": b"\x00\x01"},
         ["empty_dir"], "empty_dir: directory holds no text files"),
        ("empty file", {"empty.txt": b""}, ["empty.txt"], "empty.txt: empty corpus (no text)"),
        ("BOM only", {"bom.txt": codecs.BOM_UTF8}, ["bom.txt"], "bom.txt: empty corpus (no text besides a byte-order mark)"),
        ("too short to split", {"short.txt": b"tiny text"}, ["short.txt"], "short.txt: corpus too short to split"),
        ("invalid UTF-8", {"bad.txt": b"valid " + "\u20ac".encode() * 1000 + b"\xe2\x28\xa1 rest\n"}, ["bad.txt"],
         f"bad.txt: invalid UTF-8 at byte {bad_byte}; pass --errors replace"),
        ("binary", {"nul.txt": b"some text\x00\x01\x02"}, ["nul.txt"], "nul.txt: binary file (NUL byte at offset 9)"),
        ("UTF-16 with BOM", {"utf16.txt": "hello world\n".encode("utf-16")}, ["utf16.txt"],
         "utf16.txt: looks like UTF-16"),
        ("UTF-16 without BOM", {"utf16le.txt": "hello world\n".encode("utf-16-le")}, ["utf16le.txt"],
         "utf16le.txt: looks like UTF-16"),
        ("unknown tokenizer kind", {"ok.txt": b"fine text\n" * 10}, ["ok.txt", "--tokenizer", "wordpiece"],
         "'wordpiece' is not one of 'char', 'byte', 'bpe', 'unigram'"),
        ("output under a regular file", {"ok.txt": b"fine text\n" * 10, "a_file.txt": b"x"},
         ["ok.txt", "--out", str(blocked / "sub")], f"{blocked}: is a file, so {blocked / 'sub'} cannot be created"),
        ("output that is a regular file", {"ok.txt": b"fine text\n" * 10, "a_file.txt": b"x"},
         ["ok.txt", "--out", str(blocked)], f"{blocked}: exists and is not a directory"),
        ("unwritable output directory", {"ok.txt": b"fine text\n" * 10}, ["ok.txt", "--out", "/proc/textrnn-out"],
         "/proc: cannot create a directory here"),
        ("val fraction out of range", {"ok.txt": b"fine text\n" * 10}, ["ok.txt", "--val-fraction", "1.5"],
         "val fraction must be between 0 and 1, got 1.5"),
        ("subword vocabulary too small", {"ok.txt": b"fine text\n" * 10},
         ["ok.txt", "--tokenizer", "bpe", "--vocab-size", "50"], "vocab size 50 is too small for this corpus"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_cli_bad_input_is_one_error_line_and_exit_code_2(tmp_path, case):
    cases = _bad_inputs(tmp_path)
    assert len(cases) == 15
    name, files, args, expected = cases[case]
    for relative, content in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    if "--out" not in args:
        args = [*args, "--out", "out"]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("preprocess", *args, cwd=tmp_path)
    assert result.returncode == 2, (name, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
    assert expected in lines[0], (name, lines[0])
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, no temporaries
