"""Tests for textrnn.tokenizers: round trips on tricky text, unknown characters, save and load.

``char`` and ``byte`` are checked property-based with hypothesis (any text; any bytes, valid
UTF-8 or not). The SentencePiece kinds are trained once per module on a small corpus with a
small vocabulary, so they stay fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from textrnn.errors import CheckpointError, ConfigError, InputError
from textrnn.tokenizers import (SPACE_MARK, ByteTokenizer, CharTokenizer, SentencePieceTokenizer, check_kind,
                                describe_chars, iter_training_chunks, load_tokenizer,
                                mark_codepoints)

# Characters that trip up tokenizers: whitespace of every kind, line breaks that str.splitlines
# knows but "\n"-splitting does not, combining marks, CJK, astral emoji and joiners.
TRICKY_CHARS = [
    "\n", "\t", " ", "\r", "\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\x00",
    "\u00a0", "\u3000", "\u200b", "\u200d", "\ufeff", "\ufffd", "e\u0301", "\u0308", "\u65e5", "\u672c",
    "\U0001F600", "\U0001F469\u200d\U0001F4BB", "\U0001F1EB\U0001F1F7", "\u0645\u0631\u062d\u0628\u0627",
    SPACE_MARK, "<unk>", "<0x41>", "\\", '"',
]
TRICKY_TEXT = (
    "  leading spaces\n\n\nblank lines above\ttab\t\tdouble tab\n"
    "runs of spaces:     five\nlone CR\rhere\r\nCRLF\n"
    "line\u2028separator \x85 next-line \x1c file-separator \x0b\x0c\n"
    "caf\u00e9 cafe\u0301 na\u00efve \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \U0001F600\U0001F680 "
    "\U0001F469\u200d\U0001F4BB \u0645\u0631\u062d\u0628\u0627\n"
    f"a{SPACE_MARK}b {SPACE_MARK} <unk> <s> <0x41> \u2047\n"
    "trailing spaces   \n   "
)

any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(TRICKY_CHARS))
any_text = st.lists(any_char, max_size=60).map("".join)


# ---------------------------------------------------------------- char

def test_char_round_trip_on_tricky_text():
    tok = CharTokenizer(TRICKY_TEXT)
    ids = tok.encode(TRICKY_TEXT)
    assert tok.decode(ids) == TRICKY_TEXT
    assert len(ids) == len(TRICKY_TEXT)  # one id per code point: "e\u0301" is two
    assert tok.chars == sorted(set(TRICKY_TEXT))
    assert tok.kind == "char"
    assert tok.vocab_size == len(set(TRICKY_TEXT)) + 1  # plus the reserved unknown id
    assert np.array_equal(tok.encode_array(TRICKY_TEXT), ids)


def _no_surrogates(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@given(any_text.filter(_no_surrogates))
@settings(max_examples=200, deadline=None)
def test_char_round_trip_property(text):
    tok = CharTokenizer(text + "x")  # a vocabulary is never empty
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text, dtype=np.uint16).tolist() == tok.encode(text)


@given(any_text.filter(_no_surrogates), any_text)
@settings(max_examples=200, deadline=None)
def test_char_unknown_policies_property(known, text):
    tok = CharTokenizer(known + "x")
    unseen = {c for c in text if c not in tok.chars}
    if unseen:
        with pytest.raises(InputError, match="not in the vocabulary"):
            tok.encode(text)
    else:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, unknown="skip")) == "".join(c for c in text if c not in unseen)
    ids = tok.encode(text, unknown="unk")
    assert len(ids) == len(text)
    assert [i == tok.unk_id for i in ids] == [c in unseen for c in text]


def test_char_unknown_error_names_the_characters_and_is_never_a_key_error():
    tok = CharTokenizer("abc \n")
    with pytest.raises(InputError) as info:
        tok.encode("abz\tq\U0001F600")
    message = str(info.value)
    assert "4 character(s) not in the vocabulary" in message
    assert "'z'" in message and "'q'" in message and "'\\t'" in message and "\U0001F600" in message
    assert not isinstance(info.value, KeyError)


def test_char_unknown_id_is_reserved_and_decodes_to_replacement_character():
    tok = CharTokenizer("ab")
    assert tok.unk_id == 2 == tok.vocab_size - 1
    assert tok.encode("a?b", unknown="unk") == [0, 2, 1]
    assert tok.encode("a?b", unknown="skip") == [0, 1]
    assert tok.decode([0, 2, 1, 99, -1]) == "a\ufffdb\ufffd\ufffd"
    assert tok.unknown_chars("a?b!") == {"?", "!"}


def test_char_rejects_a_bad_unknown_policy_and_an_empty_vocabulary():
    with pytest.raises(ConfigError, match="unknown must be one of"):
        CharTokenizer("ab").encode("ab", unknown="ignore")
    with pytest.raises(InputError, match="empty text"):
        CharTokenizer("")


def test_char_vocabulary_over_255_symbols_uses_wider_ids():
    text = "".join(chr(0x4E00 + n) for n in range(300))
    tok = CharTokenizer(text)
    assert tok.encode_array(text).max() == 299
    assert tok.decode(tok.encode(text)) == text


def test_char_vocabulary_from_marked_codepoints_matches_the_text():
    seen = mark_codepoints("hello")
    mark_codepoints("w\u00f6rld \U0001F600", seen)
    mark_codepoints("", seen)
    assert seen.dtype == bool and seen.shape == (0x110000,) and seen[0x1F600] and seen.sum() == 10
    assert CharTokenizer.from_codepoints(seen).chars == sorted(set("hellow\u00f6rld \U0001F600"))


def test_char_save_and_load_round_trip(tmp_path):
    tok = CharTokenizer(TRICKY_TEXT)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == "char" and loaded.chars == tok.chars and loaded.vocab_size == tok.vocab_size
    assert loaded.decode(loaded.encode(TRICKY_TEXT)) == TRICKY_TEXT
    saved = json.loads((tmp_path / "tokenizer.json").read_bytes().decode("utf-8"))
    assert saved == {"version": 1, **tok.to_dict()}


def test_char_vocabulary_refuses_lone_surrogates_but_encoding_treats_them_as_unknown():
    # "\ud800\udcff" would come back from JSON as one astral character, so it is never saved
    with pytest.raises(InputError, match="lone surrogates: '\\\\ud800'"):
        CharTokenizer("a\ud800b")
    tok = CharTokenizer("ab")
    assert tok.encode("a\ud800b", unknown="unk") == [0, 2, 1]
    with pytest.raises(InputError, match="not in the vocabulary: '\\\\udcff'"):
        tok.encode("a\udcff")


# ---------------------------------------------------------------- byte

@given(any_text.filter(_no_surrogates))
@settings(max_examples=200, deadline=None)
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_byte_round_trip_on_any_bytes_property(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert ids == list(data)
    assert tok.decode_bytes(ids) == data  # lossless, valid UTF-8 or not
    assert tok.decode(ids) == data.decode("utf-8", "replace")


def test_byte_invalid_utf8_decodes_with_replacement_characters():
    tok = ByteTokenizer()
    data = b"ok \xff\xfe then \xe2\x82 cut \xf0\x9f\x98\x80"
    assert tok.decode(tok.encode(data)) == "ok \ufffd\ufffd then \ufffd cut \U0001F600"
    assert tok.decode(tok.encode(TRICKY_TEXT)) == TRICKY_TEXT
    assert tok.vocab_size == 256 and tok.kind == "byte"


def test_byte_surrogate_escapes_become_their_bytes():
    tok = ByteTokenizer()
    argv_text = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python reads a Latin-1 argv
    assert tok.decode_bytes(tok.encode(argv_text)) == b"caf\xe9"
    with pytest.raises(InputError, match="lone surrogate U\\+D800"):
        tok.encode("a\ud800")


def test_byte_decode_rejects_ids_out_of_range():
    with pytest.raises(InputError, match="0..255"):
        ByteTokenizer().decode([65, 256])


def test_byte_save_and_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "byte" and tok.decode(tok.encode(TRICKY_TEXT)) == TRICKY_TEXT


# ---------------------------------------------------------------- SentencePiece

def _training_text() -> str:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "to", "be", "or", "not", "caf\u00e9", "\u65e5\u672c", "def", "return"]
    lines = []
    for _ in range(600):
        indent = " " * int(rng.integers(0, 9)) if rng.random() < 0.5 else "\t" * int(rng.integers(0, 3))
        body = " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(0, 10))))
        lines.append(indent + body + ("   " if rng.random() < 0.1 else ""))
    return "\n".join(lines) + "\n\n\n" + TRICKY_TEXT


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sentencepiece(request) -> SentencePieceTokenizer:
    chunks = iter_training_chunks([_training_text()], max_chars=500)
    return SentencePieceTokenizer.train(chunks, request.param, vocab_size=400, large_alphabet=False)


@pytest.mark.parametrize("text", [
    TRICKY_TEXT,
    "\n\n\nthree newlines first",
    "tabs\tand\t\tmore\t\t\ttabs\t",
    "runs of spaces:  two   three    four     five",
    "    leading spaces and trailing spaces    ",
    "  \n  \n\t\n",
    f"a literal {SPACE_MARK} and {SPACE_MARK}{SPACE_MARK} twice{SPACE_MARK}",
    "never seen: \u0416\u0436 \U0001F99C \x00 \x7f \u00ff",  # byte fallback
    "",
])
def test_sentencepiece_round_trip(sentencepiece, text):
    ids = sentencepiece.encode(text)
    assert sentencepiece.decode(ids) == text
    assert all(0 <= i < sentencepiece.vocab_size for i in ids)
    assert sentencepiece.encode_array(text).tolist() == ids


def test_sentencepiece_learns_subwords_and_keeps_newlines_as_symbols(sentencepiece):
    text = _training_text()
    ids = sentencepiece.encode(text)
    assert len(ids) < 0.8 * len(text)  # learned pieces longer than a character
    newline = sentencepiece.encode("\n")
    assert len(newline) == 1 and ids.count(newline[0]) == text.count("\n")


@given(st.lists(st.sampled_from(["the", "king", " ", "  ", "\n", "\t", "\r", SPACE_MARK, "\u65e5", "x", "\U0001F600",
                                  "\u2028", "\x85", "\x1c", "e\u0301"]), max_size=30).map("".join))
@settings(max_examples=150, deadline=None)
def test_sentencepiece_round_trip_property(sentencepiece, text):
    assert sentencepiece.decode(sentencepiece.encode(text)) == text


def test_sentencepiece_lone_surrogate_is_an_input_error(sentencepiece):
    with pytest.raises(InputError, match="lone surrogate U\\+DCFF at character 3"):
        sentencepiece.encode("abc\udcff")


def test_sentencepiece_decode_of_invalid_ids_gives_replacement_characters(sentencepiece):
    ok = sentencepiece.encode("king")
    assert sentencepiece.decode(ok + [sentencepiece.vocab_size, -5] + ok) == "king\ufffd\ufffdking"
    byte_e2 = sentencepiece._sp.PieceToId("<0xE2>")  # a lone lead byte: invalid UTF-8
    assert sentencepiece.decode([byte_e2]) == "\ufffd"


def test_sentencepiece_save_and_load(tmp_path, sentencepiece):
    sentencepiece.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == sentencepiece.kind and loaded.vocab_size == sentencepiece.vocab_size
    assert loaded.encode(TRICKY_TEXT) == sentencepiece.encode(TRICKY_TEXT)
    assert loaded.decode(loaded.encode(TRICKY_TEXT)) == TRICKY_TEXT


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_too_large_a_vocabulary_is_lowered_with_a_warning(kind):
    warnings = []
    tok = SentencePieceTokenizer.train(["abc abd abe\n" * 20, "xyz\tq\n"], kind, vocab_size=5000,
                                       large_alphabet=False, warn=warnings.append)
    assert 256 < tok.vocab_size < 5000
    assert len(warnings) == 1 and "vocab size 5000 is more than this corpus supports" in warnings[0]
    assert tok.decode(tok.encode("abd\txyz  q\n")) == "abd\txyz  q\n"


def test_sentencepiece_too_small_a_vocabulary_names_the_minimum():
    with pytest.raises(ConfigError, match=r"vocab size 100 is too small .* at least \d+"):
        SentencePieceTokenizer.train(["abc abd\n" * 20], "bpe", vocab_size=100, large_alphabet=False)


def test_sentencepiece_needs_text_and_a_known_kind():
    with pytest.raises(InputError, match="no text"):
        SentencePieceTokenizer.train([SPACE_MARK, ""], "bpe", vocab_size=300, large_alphabet=False)
    with pytest.raises(ConfigError, match="kind must be one of"):
        SentencePieceTokenizer(b"", "wordpiece")
    with pytest.raises(CheckpointError, match="not a valid SentencePiece model"):
        SentencePieceTokenizer(b"not a model", "bpe")


# ---------------------------------------------------------------- helpers and loading

@given(st.lists(st.text(st.sampled_from("ab \n\u65e5"), max_size=50), max_size=20), st.integers(1, 12))
@settings(max_examples=200, deadline=None)
def test_training_chunks_keep_all_text_and_cut_after_newlines(chunks, max_chars):
    pieces = list(iter_training_chunks(chunks, max_chars=max_chars))
    assert "".join(pieces) == "".join(chunks)
    assert all(0 < len(p) <= max_chars for p in pieces)
    for piece in pieces[:-1]:  # cut after a newline whenever one is in reach
        assert piece.endswith("\n") or "\n" not in piece


def test_describe_chars_escapes_invisible_characters():
    shown = describe_chars(["\t", " ", "a", "\u2028", "\x1c"])
    assert shown == "'\\t', '\\x1c', ' ', 'a', '\\u2028'"
    assert describe_chars("abcdefghijkl", limit=3) == "'a', 'b', 'c' and 9 more"


def test_check_kind():
    assert check_kind("unigram") == "unigram"
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'wordpiece'; choose one of char, byte, bpe, unigram"):
        check_kind("wordpiece")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json here"):
        load_tokenizer(tmp_path)
    file = tmp_path / "tokenizer.json"
    file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer file"):
        load_tokenizer(tmp_path)
    file.write_text(json.dumps({"version": 99, "kind": "char", "chars": "ab"}))
    with pytest.raises(CheckpointError, match="newer than this textrnn understands"):
        load_tokenizer(tmp_path)
    file.write_text(json.dumps({"version": 1, "kind": "wordpiece"}))
    with pytest.raises(CheckpointError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    file.write_text(json.dumps({"version": 1, "kind": "char", "chars": ""}))
    with pytest.raises(CheckpointError, match="no vocabulary"):
        load_tokenizer(tmp_path)
    file.write_text(json.dumps({"version": 1, "kind": "bpe"}))
    with pytest.raises(CheckpointError, match="cannot read the SentencePiece model"):
        load_tokenizer(tmp_path)
