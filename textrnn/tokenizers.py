"""Tokenizers: text <-> token ids, saved beside the data and the weights.

Four kinds share one protocol (``encode``, ``decode``, ``vocab_size``, ``kind``, ``save``):
``char`` (Unicode code points, vocabulary from the corpus), ``byte`` (256 symbols, lossless for
anything), and ``bpe``/``unigram`` (SentencePiece, configured to keep every whitespace).
Reading files and splitting corpora lives in ``data.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import CheckpointError, ConfigError, InputError
from .fileio import atomic_write_bytes, atomic_write_text, read_regular_file

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
FORMAT_VERSION = 1
UNKNOWN_POLICIES = ("error", "skip", "unk")
SENTENCEPIECE_KINDS = ("bpe", "unigram")
SPACE_MARK = "\u2581"  # SentencePiece's internal spelling of a space


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, unknown: str = "error") -> list[int]: ...

    def encode_array(self, text: str, unknown: str = "error", dtype: np.dtype | type = np.int64) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: Path) -> None: ...

    def to_dict(self) -> dict: ...


def describe_chars(chars: Iterable[str], limit: int = 8) -> str:
    """A short readable list of characters, escaping the invisible ones."""
    chars = sorted(set(chars))
    shown = ", ".join(repr(c) if c.isprintable() and c != " " else ascii(c) for c in chars[:limit])
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return shown + more


def _codepoints(text: str) -> np.ndarray:
    """Code points of a string, vectorised (no Python loop over characters).

    ASCII text (the common case, and O(1) to detect) comes out as uint8; anything else as uint32.
    Lone surrogates pass through as their own code points.
    """
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _surrogate_error(exc: UnicodeEncodeError) -> InputError:
    return InputError(f"text holds a lone surrogate U+{ord(exc.object[exc.start]):04X} at character "
                      f"{exc.start}, which has no UTF-8 encoding")


def _check_encodable(text: str) -> None:
    """SentencePiece reads UTF-8, so a lone surrogate (say from undecodable argv bytes) is an error."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _surrogate_error(exc) from None


def _check_unknown_policy(unknown: str) -> None:
    if unknown not in UNKNOWN_POLICIES:
        raise ConfigError(f"unknown must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")


def smallest_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds the ids ``0 .. vocab_size - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ConfigError(f"vocab size {vocab_size} is too large")


class CharTokenizer:
    """One id per Unicode code point seen in the corpus, sorted; plus one reserved unknown id.

    The unknown id (the last one) never occurs in training data. Encoding a character outside
    the vocabulary raises by default; ``unknown="unk"`` maps it to the unknown id and
    ``unknown="skip"`` drops it. Decoding the unknown id gives U+FFFD. A vocabulary grown for
    fine-tuning (``extended``) keeps its base's ids and is no longer sorted: ``ordered=True``
    takes the characters in the order given (how a saved vocabulary is read back).
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], ordered: bool = False):
        chars = list(chars)
        self.chars: list[str] = list(dict.fromkeys(chars)) if ordered else sorted(set(chars))
        if not self.chars:
            raise InputError("cannot build a character vocabulary from empty text")
        if len(self.chars) != len(chars) and ordered:
            raise InputError("a character vocabulary lists a character twice")
        surrogates = [c for c in self.chars if 0xD800 <= ord(c) <= 0xDFFF]
        if surrogates:  # no file decodes to one, and tokenizer.json (UTF-8) could not hold it
            raise InputError(f"a character vocabulary cannot hold lone surrogates: {describe_chars(surrogates)}")
        self._index = {c: i for i, c in enumerate(self.chars)}
        self.unk_id = len(self.chars)
        # code point -> id over all of Unicode (1-4 MiB): one np.take encodes a chunk, with no
        # bounds checks. Code points outside the vocabulary hold a sentinel one past the unknown id.
        self._missing = len(self.chars) + 1
        self._lookup = np.full(0x110000, self._missing, dtype=smallest_dtype(self._missing + 1))
        self._lookup[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def from_codepoints(cls, seen: np.ndarray) -> "CharTokenizer":
        """Build from an array over code points, nonzero where the corpus has that character
        (see ``mark_codepoints``)."""
        return cls(chr(int(p)) for p in np.flatnonzero(seen))

    def extended(self, seen: np.ndarray) -> "CharTokenizer":
        """This vocabulary with the characters marked in ``seen`` that it lacks added after its own,
        sorted, as one block: every id of this vocabulary but the unknown one keeps its character,
        and the unknown id stays last."""
        added = np.flatnonzero(seen).tolist()
        return CharTokenizer(self.chars + [chr(p) for p in added if chr(p) not in self._index], ordered=True)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode_array(self, text: str, unknown: str = "error", dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Ids of ``text`` as a ``dtype`` array (preprocess asks for its on-disk dtype directly)."""
        _check_unknown_policy(unknown)
        points = _codepoints(text)
        ids = np.take(self._lookup, points, mode="clip")  # every code point is < 0x110000
        missing = ids == self._missing
        if missing.any():
            if unknown == "error":
                unseen = [chr(p) for p in np.unique(points[missing])]
                raise InputError(f"{len(unseen)} character(s) not in the vocabulary: {describe_chars(unseen)}")
            if unknown == "skip":
                ids = ids[~missing]
            else:
                ids[missing] = self.unk_id
        return ids.astype(dtype, copy=False)

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        return self.encode_array(text, unknown).tolist()

    def unknown_chars(self, text: str) -> set[str]:
        return {c for c in set(text) if c not in self._index}

    def decode(self, ids: Iterable[int]) -> str:
        chars, n = self.chars, len(self.chars)
        return "".join(chars[i] if 0 <= i < n else "\ufffd" for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "chars": "".join(self.chars)}

    def save(self, directory: Path) -> None:
        _write_json(Path(directory) / TOKENIZER_FILE, {"version": FORMAT_VERSION, **self.to_dict()})


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding: lossless for any input, even invalid UTF-8.

    Text decodes with replacement characters where generated bytes are not valid UTF-8.
    """

    kind = "byte"
    vocab_size = 256

    def encode_array(self, text: str | bytes, unknown: str = "error", dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Ids of the UTF-8 bytes of ``text``; ``bytes`` are taken as they are, valid UTF-8 or not.

        Lone surrogates from ``surrogateescape`` (how Python reads undecodable bytes from the
        command line) become the bytes they stand for.
        """
        if isinstance(text, str):
            try:
                text = text.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError as exc:
                raise _surrogate_error(exc) from None
        return np.frombuffer(text, dtype=np.uint8).astype(dtype)

    def encode(self, text: str | bytes, unknown: str = "error") -> list[int]:
        return list(text if isinstance(text, bytes) else self.encode_array(text, dtype=np.uint8).tobytes())

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = np.fromiter((int(i) for i in ids), dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() > 255):
            raise InputError(f"byte ids must be 0..255, got {int(ids.min() if ids.min() < 0 else ids.max())}")
        return ids.astype(np.uint8).tobytes()

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    def save(self, directory: Path) -> None:
        _write_json(Path(directory) / TOKENIZER_FILE, {"version": FORMAT_VERSION, **self.to_dict()})


class SentencePieceTokenizer:
    """A SentencePiece ``bpe`` or ``unigram`` model trained so that decode(encode(s)) == s.

    SentencePiece drops newlines and collapses spaces by default; here "\\n" is a user-defined
    symbol (so a piece never spans a line break), normalisation is the identity, no dummy prefix
    is added, extra whitespace is kept, and byte fallback covers any character the model has not
    seen: tabs, CR, control characters, rare emoji. One character needs help: SentencePiece writes
    spaces as U+2581 "▁" internally and decodes that character back to a space, so a literal "▁"
    in the text is encoded as its three UTF-8 byte pieces instead.
    """

    def __init__(self, model_proto: bytes, kind: str):
        import sentencepiece as spm

        if kind not in SENTENCEPIECE_KINDS:
            raise ConfigError(f"SentencePiece kind must be one of {', '.join(SENTENCEPIECE_KINDS)}, got {kind!r}")
        self.kind = kind
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise CheckpointError(f"not a valid SentencePiece model ({exc})") from None
        self._space_mark_ids = [self._sp.PieceToId(f"<0x{b:02X}>") for b in SPACE_MARK.encode("utf-8")]
        if self._sp.unk_id() in self._space_mark_ids:
            raise CheckpointError("the SentencePiece model has no byte pieces; it was not trained by textrnn")

    @classmethod
    def train(cls, sentences: Iterable[str], kind: str, vocab_size: int, large_alphabet: bool,
              warn: Callable[[str], None] = lambda _: None) -> "SentencePieceTokenizer":
        """Train on an iterator of multi-line text chunks (already sampled and bounded by the caller).

        A ``vocab_size`` beyond what the corpus supports is lowered to the largest possible
        size with a warning, not an error. One too small for the corpus's characters plus the
        256 byte pieces is an error that names the smallest size that works.
        """
        import io

        import sentencepiece as spm

        # the literal space mark is always encoded as bytes (see the class docstring)
        chunks = [chunk.replace(SPACE_MARK, "") for chunk in sentences]
        chunks = [chunk for chunk in chunks if chunk]
        if not chunks:
            raise InputError("no text to train a SentencePiece model on")
        options = dict(
            model_type=kind, vocab_size=vocab_size, character_coverage=0.9995 if large_alphabet else 1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_by_whitespace=True, user_defined_symbols=["\n"], byte_fallback=True, unk_surface="\ufffd",
            max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
            bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2, num_threads=min(4, os.cpu_count() or 1),
        )
        for _ in range(3):
            stream = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(sentence_iterator=iter(chunks), model_writer=stream, **options)
                return cls(stream.getvalue(), kind)
            except RuntimeError as exc:
                message = str(exc)
                too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
                too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
                if too_high:
                    limit = int(too_high.group(2))
                    warn(f"warning: vocab size {options['vocab_size']} is more than this corpus supports; "
                         f"using {limit}")
                    options["vocab_size"] = limit
                    continue
                if too_low:
                    raise ConfigError(f"vocab size {vocab_size} is too small for this corpus: its characters and "
                                      f"the 256 byte pieces need at least {too_low.group(2)}") from None
                raise ConfigError(f"SentencePiece training failed: {message.strip().splitlines()[-1]}") from None
        raise ConfigError(f"SentencePiece could not train a {kind} model with vocab size {vocab_size}")

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str, unknown: str = "error") -> list[int]:
        """Ids of ``text``; every string is encodable (byte fallback), so ``unknown`` has no effect."""
        _check_encodable(text)
        if SPACE_MARK not in text:
            return self._sp.EncodeAsIds(text)
        parts = self._sp.EncodeAsIds(text.split(SPACE_MARK))
        ids = parts[0]
        for part in parts[1:]:
            ids += self._space_mark_ids
            ids += part
        return ids

    def encode_array(self, text: str, unknown: str = "error", dtype: np.dtype | type = np.int64) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ids outside the vocabulary and invalid UTF-8 bytes decode to U+FFFD."""
        size, unk = self.vocab_size, self._sp.unk_id()
        ids = [i if 0 <= i < size else unk for i in map(int, ids)]
        return self._sp.DecodeIds(ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "model_file": SENTENCEPIECE_FILE}

    def save(self, directory: Path) -> None:
        atomic_write_bytes(Path(directory) / SENTENCEPIECE_FILE, self.model_proto)
        _write_json(Path(directory) / TOKENIZER_FILE, {"version": FORMAT_VERSION, **self.to_dict()})


def mark_codepoints(text: str, seen: np.ndarray | None = None) -> np.ndarray:
    """Mark the code points of ``text`` in ``seen``, a bool array over all of Unicode.

    For building char vocabularies chunk by chunk, and fast on text that is mostly ASCII: the
    ASCII characters already seen are deleted from the UTF-8 bytes by one C call (deleting
    ASCII bytes leaves valid UTF-8), and only what is left goes through numpy.
    """
    if seen is None:
        seen = np.zeros(0x110000, dtype=bool)
    known_ascii = np.flatnonzero(seen[:128]).astype(np.uint8).tobytes()
    rest = text.encode("utf-8", "surrogatepass").translate(None, known_ascii)
    if rest:
        points = _codepoints(rest.decode("utf-8", "surrogatepass"))
        known = np.take(seen, points, mode="clip")  # every code point is < 0x110000
        if not known.all():
            seen[np.unique(points[~known])] = True
    return seen


def iter_training_chunks(text_chunks: Iterable[str], max_chars: int = 4000) -> Iterator[str]:
    """Cut text into multi-line pieces of at most ``max_chars`` for SentencePiece training.

    Pieces end after a newline where one is in reach (SentencePiece sees "\\n" as a symbol); a
    line longer than ``max_chars`` is cut into several pieces, so no text is ever dropped for
    its length.
    """
    rest = ""
    for chunk in text_chunks:
        text, start = rest + chunk, 0
        while len(text) - start >= max_chars:
            cut = text.rfind("\n", start, start + max_chars)
            end = start + max_chars if cut < start else cut + 1
            yield text[start:end]
            start = end
        rest = text[start:]
    if rest:
        yield rest


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def tokenizer_from_dict(data: dict, directory: Path) -> Tokenizer:
    kind = data.get("kind")
    if kind == "char":
        chars = data.get("chars")
        if not isinstance(chars, str) or not chars:
            raise CheckpointError(f"{directory / TOKENIZER_FILE}: char tokenizer has no vocabulary")
        return CharTokenizer(chars, ordered=True)
    if kind == "byte":
        return ByteTokenizer()
    if kind in SENTENCEPIECE_KINDS:
        model_path = directory / SENTENCEPIECE_FILE
        try:
            proto = read_regular_file(model_path)
        except OSError as exc:
            raise CheckpointError(f"{model_path}: cannot read the SentencePiece model ({exc.strerror})") from None
        try:
            return SentencePieceTokenizer(proto, kind)
        except CheckpointError as exc:  # say which file
            raise CheckpointError(f"{model_path}: {exc}") from None
    raise CheckpointError(f"{directory / TOKENIZER_FILE}: unknown tokenizer kind {kind!r}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in a run directory or a preprocess directory."""
    directory = Path(path)
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{directory}: no {TOKENIZER_FILE} here; is this a textrnn run or data directory?")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a valid tokenizer file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: not a valid tokenizer file")
    if not isinstance(data.get("version"), int) or data["version"] > FORMAT_VERSION:
        raise CheckpointError(f"{file}: tokenizer format version {data.get('version')!r} is newer than this "
                              f"textrnn understands ({FORMAT_VERSION}); upgrade textrnn")
    return tokenizer_from_dict(data, directory)


def check_kind(kind: str) -> str:
    from .config import TOKENIZERS

    if kind not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZERS)}")
    return kind
