"""Text on disk to token ids on disk, and token ids to truncated-BPTT batch streams.

Reading is chunked and incremental (a BOM dropped, CRLF turned into LF, invalid UTF-8 and binary
files reported with file and byte offset), so corpora larger than memory preprocess in bounded
memory. Ids go to ``train.bin``/``val.bin`` in the smallest unsigned dtype, read back through
``numpy.memmap``. Tokenizers live in ``tokenizers.py``; the model never appears here.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import DATA_FORMAT, FORMAT_VERSION, check_format, read_json, staging_directory, write_json
from .errors import CheckpointError, ConfigError, InputError
from .fileio import file_sha256
from .tokenizers import (SENTENCEPIECE_KINDS, ByteTokenizer, CharTokenizer, SentencePieceTokenizer, Tokenizer,
                         check_kind, iter_training_chunks, load_tokenizer, mark_codepoints,
                         smallest_dtype)

CHUNK_BYTES = 1 << 22  # 4 MiB of raw text per read
FILE_SEPARATOR = "\n\n"  # joins several input files; every tokenizer keeps it
META_FILE = "meta.json"
SPLITS = ("train", "val")
SNIFF_BYTES = 8192
SENTENCEPIECE_SAMPLE_CHARS = 20_000_000  # SentencePiece trains on at most this much text


# ---------------------------------------------------------------- reading text

def _describe_decode_error(path: Path, offset: int) -> str:
    return (f"{path}: invalid UTF-8 at byte {offset}; pass --errors replace to read it "
            f"with replacement characters, or convert it to UTF-8")


def _check_not_binary(path: Path, raw: bytes, offset: int, first: bool) -> None:
    """Reject UTF-16/UTF-32 (by byte-order mark, or by the NULs of its ASCII) and other binary data."""
    if first and raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise InputError(f"{path}: looks like UTF-32 (byte-order mark); convert it to UTF-8")
    if first and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise InputError(f"{path}: looks like UTF-16 (byte-order mark); convert it to UTF-8")
    nul = raw.find(b"\x00")
    if nul < 0:
        return
    head = raw[:SNIFF_BYTES]
    if first and len(head) >= 4 and (head[0::2].count(0) > 0.9 * len(head[0::2])
                                      or head[1::2].count(0) > 0.9 * len(head[1::2])):
        raise InputError(f"{path}: looks like UTF-16 (every other byte is NUL); convert it to UTF-8")
    raise InputError(f"{path}: binary file (NUL byte at offset {offset + nul}); expected UTF-8 text")


def read_chunks(path: Path, errors: str = "strict", newline: str = "lf", chunk_bytes: int = CHUNK_BYTES,
                on_raw: Callable[[bytes], None] | None = None) -> Iterator[str]:
    """Decoded text of one file in chunks: BOM dropped, CRLF -> LF unless ``newline="keep"``.

    Raises InputError naming the file and byte offset for invalid UTF-8 (when ``errors`` is
    strict) and for NUL bytes, which mark a binary file; UTF-16 and UTF-32 are named as such.
    ``on_raw`` sees every block of raw bytes as it is read (progress bars, checksums).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0  # bytes read so far
    first = True  # no text yielded yet: a BOM may still come
    pending_cr = False  # a chunk ended in "\r": its "\n" may start the next one
    try:
        handle = open(path, "rb")
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a text file") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        while True:
            try:
                raw = handle.read(chunk_bytes)
            except OSError as exc:
                raise InputError(f"{path}: cannot read ({exc.strerror})") from None
            final = not raw
            _check_not_binary(path, raw, offset, offset == 0)
            try:
                text = decoder.decode(raw, final)
            except UnicodeDecodeError as exc:
                # exc.start counts from the bytes the decoder held back from the previous block
                held_back = len(decoder.getstate()[0])
                raise InputError(_describe_decode_error(path, offset - held_back + exc.start)) from None
            offset += len(raw)
            if on_raw is not None and raw:
                on_raw(raw)
            if first and text:
                text = text.removeprefix("\ufeff")
                first = False
            if newline == "lf":
                if pending_cr:
                    text = "\r" + text
                pending_cr = text.endswith("\r") and not final
                if pending_cr:
                    text = text[:-1]
                if "\r" in text:  # a fast scan; replace() alone is ten times slower on long text
                    text = text.replace("\r\n", "\n")
            if text:
                yield text
            if final:
                return


def _looks_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError:
        return False
    return b"\x00" in head


def resolve_inputs(inputs: Iterable[str | os.PathLike], warn: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Files to read, in order: files as given; directories as their text files, sorted, recursively.

    Hidden files and directories are skipped, and so are binary files found inside a directory
    (with a warning); a binary file named directly is an error when it is read.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, skipped = [], 0
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                for name in sorted(names):
                    child = Path(root) / name
                    if name.startswith(".") or not child.is_file():
                        continue
                    if _looks_binary(child):
                        skipped += 1
                        continue
                    found.append(child)
            if not found:
                binary = f" ({skipped} binary file(s) skipped)" if skipped else ""
                raise InputError(f"{path}: directory holds no text files{binary}")
            if skipped:
                warn(f"warning: {path}: skipped {skipped} binary file(s)")
            files.extend(found)
        elif path.exists():
            if not os.access(path, os.R_OK):
                raise InputError(f"{path}: permission denied")
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory")
    if not files:
        raise InputError("no input files given")
    return files


def iter_corpus(files: list[Path], errors: str = "strict", newline: str = "lf",
                on_raw: Callable[[int, bytes], None] | None = None) -> Iterator[str]:
    """The text of all files in order, joined by ``FILE_SEPARATOR``, in chunks.

    ``on_raw(index, block)`` sees the raw bytes of ``files[index]`` as they are read.
    """
    for index, path in enumerate(files):
        if index:
            yield FILE_SEPARATOR
        yield from read_chunks(path, errors, newline,
                               on_raw=None if on_raw is None else lambda raw, index=index: on_raw(index, raw))


# ---------------------------------------------------------------- preprocessing

@dataclass
class _SplitWriter:
    """Appends ids to one split's .bin file and counts tokens and characters."""

    handle: object
    dtype: np.dtype
    tokens: int = 0
    chars: int = 0

    def write(self, ids: np.ndarray, chars: int) -> None:
        self.handle.write(np.ascontiguousarray(ids, dtype=self.dtype))
        self.tokens += len(ids)
        self.chars += chars


def _build_tokenizer(kind: str, files: list[Path], errors: str, newline: str, vocab_size: int | None,
                     total_chars: int, seen: np.ndarray | None, warn: Callable[[str], None],
                     start_from: Tokenizer | None = None) -> Tokenizer:
    if start_from is not None:  # a fine-tuned model's ids must mean what they meant to its base
        return start_from.extended(seen) if isinstance(start_from, CharTokenizer) else start_from
    if kind == "char":
        return CharTokenizer.from_codepoints(seen)
    if kind == "byte":
        return ByteTokenizer()
    # SentencePiece: a bounded, evenly spread sample of multi-line chunks
    keep = min(1.0, SENTENCEPIECE_SAMPLE_CHARS / max(total_chars, 1))
    rng = random.Random(0)
    pieces = (p for p in iter_training_chunks(iter_corpus(files, errors, newline)) if keep >= 1 or rng.random() < keep)
    distinct = int(np.count_nonzero(seen)) if seen is not None else 0
    return SentencePieceTokenizer.train(pieces, kind, vocab_size or 2000, large_alphabet=distinct > 1000, warn=warn)


def _check_output_dir(out_dir: Path) -> None:
    """Refuse an --out that is a file, lies under a file, or is a directory preprocess did not make.

    The finished output replaces ``out_dir`` as a whole, so anything else there would be lost.
    """
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a directory; choose another --out")
        if any(out_dir.iterdir()) and not is_dataset_dir(out_dir):
            raise InputError(f"{out_dir}: directory is not empty and was not made by preprocess; "
                             f"choose another --out (it would be replaced)")
        return
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{parent}: is a file, so {out_dir} cannot be created there")
            return


def preprocess(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, *, tokenizer: str = "char",
               vocab_size: int | None = None, val_fraction: float = 0.1, errors: str = "strict",
               newline: str = "lf", progress: bool = False, warn: Callable[[str], None] = lambda _: None,
               start_from: Tokenizer | None = None) -> Path:
    """Tokenize text files into ``out_dir``: train.bin, val.bin, the tokenizer files and meta.json.

    Two passes over the text in chunks, so memory stays bounded: the first checks it, counts its
    characters and (``char``) finds the vocabulary; the second encodes it straight into the
    split files. The last ``val_fraction`` of the characters is the validation split. Output is
    built in a temporary directory renamed at the end, so a failure leaves nothing that looks valid.

    ``start_from`` (a tokenizer of kind ``tokenizer``) encodes with an existing vocabulary, as
    fine-tuning needs: a char vocabulary is extended by the corpus's new characters (see
    ``CharTokenizer.extended``); byte and SentencePiece tokenizers are used as they are.
    """
    _check_preprocess_options(tokenizer, start_from, errors, newline, val_fraction)
    files = resolve_inputs(inputs, warn)
    out_dir = Path(out_dir)
    _check_output_dir(out_dir)

    # Created first, so an unwritable --out fails before any work; removed on any failure.
    with staging_directory(out_dir) as tmp:
        scan = _scan(files, errors, newline, tokenizer, progress)  # pass 1
        val_chars = int(scan.chars * val_fraction)
        train_chars = scan.chars - val_chars
        if val_chars < 2 or train_chars < 2:
            raise InputError(f"{_names(files)}: corpus too short to split into train and val "
                             f"({scan.chars} characters at val fraction {val_fraction})")
        tok = _build_tokenizer(tokenizer, files, errors, newline, vocab_size, scan.chars, scan.seen, warn, start_from)
        if vocab_size is not None and tokenizer in ("char", "byte"):
            warn(f"warning: --vocab-size applies to bpe and unigram tokenizers; "
                 f"the {tokenizer} vocabulary has {tok.vocab_size}")
        dtype = smallest_dtype(tok.vocab_size)
        writers = _encode_splits(tmp, files, tok, dtype, errors, newline, train_chars, scan, progress)  # pass 2
        tok.save(tmp)
        meta = {
            "format": DATA_FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
            "tokenizer": tok.to_dict(),
            "splits": {name: {"tokens": w.tokens, "chars": w.chars, "sha256": file_sha256(tmp / f"{name}.bin")}
                       for name, w in writers.items()},
            "sources": [{"path": str(f), "bytes": size, "sha256": digest.hexdigest()}
                        for f, size, digest in zip(files, scan.sizes, scan.digests)],
            "newline": "crlf->lf" if newline == "lf" else "keep", "errors": errors,
            "val_fraction": val_fraction, "separator": FILE_SEPARATOR,
        }
        write_json(tmp / META_FILE, meta)
    return out_dir


def _check_preprocess_options(tokenizer: str, start_from: Tokenizer | None, errors: str, newline: str,
                              val_fraction: float) -> None:
    check_kind(tokenizer)
    if start_from is not None and start_from.kind != tokenizer:
        raise ConfigError(f"cannot encode a {tokenizer} corpus with a {start_from.kind} tokenizer")
    if errors not in ("strict", "replace"):
        raise ConfigError(f"errors must be strict or replace, got {errors!r}")
    if newline not in ("lf", "keep"):
        raise ConfigError(f"newline must be lf or keep, got {newline!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val fraction must be between 0 and 1, got {val_fraction}")


@dataclass
class _Scan:
    """What the first pass learns of the corpus."""

    bytes: int  # of all files, as read
    chars: int  # after decoding and newline handling
    sizes: list[int]  # bytes per file
    digests: list  # sha256 per file
    seen: np.ndarray | None  # the code points that occur (char and SentencePiece)


def _scan(files: list[Path], errors: str, newline: str, tokenizer: str, progress: bool) -> _Scan:
    """Pass 1: validate, count characters, checksum, and (char, SentencePiece) mark the code points."""
    total_bytes = sum(f.stat().st_size for f in files)
    digests = [hashlib.sha256() for _ in files]
    sizes = [0] * len(files)
    seen = None if tokenizer == "byte" else np.zeros(0x110000, dtype=bool)
    total_chars = 0
    with _bar(progress, total_bytes, "reading") as bar:
        def on_raw(index: int, raw: bytes) -> None:
            digests[index].update(raw)
            sizes[index] += len(raw)
            bar.update(len(raw))

        for chunk in iter_corpus(files, errors, newline, on_raw):
            if seen is not None:
                mark_codepoints(chunk, seen)
            total_chars += len(chunk)
    if total_chars == 0:
        bom_only = " besides a byte-order mark" if total_bytes else ""
        raise InputError(f"{_names(files)}: empty corpus (no text{bom_only})")
    return _Scan(total_bytes, total_chars, sizes, digests, seen)


def _encode_splits(tmp: Path, files: list[Path], tok: Tokenizer, dtype: np.dtype, errors: str, newline: str,
                   train_chars: int, scan: _Scan, progress: bool) -> dict[str, "_SplitWriter"]:
    """Pass 2: encode in chunks straight into the split files; the first ``train_chars`` characters train."""
    with contextlib.ExitStack() as files_open:
        writers = {name: _SplitWriter(files_open.enter_context(open(tmp / f"{name}.bin", "wb")), dtype)
                   for name in SPLITS}
        encoded = 0  # characters so far
        with _bar(progress, scan.bytes, "encoding") as bar:
            chunks = iter_corpus(files, errors, newline, lambda _, raw: bar.update(len(raw)))
            for chunk in _sentence_aligned(chunks, tok.kind):
                cut = min(max(0, train_chars - encoded), len(chunk))
                for text, name in ((chunk[:cut], "train"), (chunk[cut:], "val")):
                    if text:
                        writers[name].write(tok.encode_array(text, unknown="error", dtype=dtype), len(text))
                encoded += len(chunk)
    if encoded != scan.chars:
        raise InputError(f"{_names(files)}: changed while it was being read; run preprocess again")
    return writers


def _sentence_aligned(chunks: Iterable[str], kind: str) -> Iterator[str]:
    """For SentencePiece, re-cut chunks after a newline so no piece straddles two encode calls.

    Pieces never span a newline (it is a user-defined symbol), so encoding line-aligned pieces
    gives the same ids as encoding the whole text. Text with no newline in sight is cut at the
    last space, or anywhere, rather than held in memory without bound.
    """
    if kind not in SENTENCEPIECE_KINDS:
        yield from chunks
        return
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        if len(buffer) < CHUNK_BYTES // 4:
            continue
        end = buffer.rfind("\n") + 1
        if end == 0 and len(buffer) > CHUNK_BYTES:
            end = buffer.rfind(" ")  # a space starts a piece, so cut just before it
            end = end if end > 0 else len(buffer)
        if end > 0:
            yield buffer[:end]
            buffer = buffer[end:]
    if buffer:
        yield buffer


def _names(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"


class _NullBar:
    total = 0

    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------- datasets on disk

@dataclass
class Dataset:
    """A preprocessed directory: memmapped splits plus the tokenizer and meta.json."""

    path: Path
    meta: dict
    tokenizer: Tokenizer

    def split(self, name: str) -> np.ndarray:
        file = self.path / f"{name}.bin"
        expected = self.meta["splits"][name]["tokens"]
        try:
            size = file.stat().st_size
        except OSError:
            raise CheckpointError(f"{file}: missing") from None
        itemsize = np.dtype(self.meta["dtype"]).itemsize
        if size != expected * itemsize:
            raise CheckpointError(f"{file}: holds {size // itemsize} tokens, meta.json says {expected}; re-run preprocess")
        if expected == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(file, dtype=self.meta["dtype"], mode="r")

    def chars_per_token(self, name: str = "val") -> float:
        split = self.meta["splits"][name]
        return split["chars"] / max(split["tokens"], 1)


def load_dataset(path: str | os.PathLike) -> Dataset:
    path = Path(path)
    meta = read_json(path / META_FILE, "data directory")
    check_format(meta, DATA_FORMAT, path / META_FILE)
    if meta.get("dtype") not in ("uint8", "uint16", "uint32"):
        raise CheckpointError(f"{path / META_FILE}: unknown dtype {meta.get('dtype')!r}")
    return Dataset(path, meta, load_tokenizer(path))


def is_dataset_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


# ---------------------------------------------------------------- truncated BPTT streams

class TrainStreams:
    """Training windows for truncated BPTT, ``streams`` contiguous streams at a time.

    The ids (after a random per-epoch offset) are cut into ``total_streams`` equal columns; a
    process owns the block ``[first, first + streams)`` of them (all of them without DDP). Window
    ``t`` of every stream is fed at step ``t`` of the epoch, so the hidden state of stream ``b``
    at step ``t`` has seen exactly the text before window ``t`` in column ``b``::

        ids:      |--- stream 0 ---|--- stream 1 ---| ... |--- stream B-1 ---|
        step t:     [t*L, (t+1)*L)   [t*L, (t+1)*L)         [t*L, (t+1)*L)      (x; y shifted by 1)
    """

    def __init__(self, ids: np.ndarray, seq_len: int, streams: int, seed: int,
                 total_streams: int | None = None, first: int = 0):
        self.ids, self.seq_len, self.seed = ids, seq_len, seed
        self.streams = streams
        self.total_streams = total_streams or streams
        self.first = first
        # same number of steps every epoch, whatever the offset
        self.stream_len = (len(ids) - seq_len) // self.total_streams
        self.steps_per_epoch = (self.stream_len - 1) // seq_len if self.stream_len > 0 else 0
        if self.steps_per_epoch < 1:
            need = self.total_streams * (seq_len + 1) + seq_len
            raise InputError(f"training split too short: {len(ids)} tokens, but batch size {self.total_streams} x "
                             f"window {seq_len} needs at least {need}; use a smaller --batch-size or --seq-len")

    def offset(self, epoch: int) -> int:
        """Random start of an epoch, from (seed, epoch): resumable without saving RNG state."""
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len))

    def window(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of one step, each [streams, seq_len] int64."""
        start = self.offset(epoch) + step * self.seq_len
        rows = []
        for b in range(self.first, self.first + self.streams):
            begin = start + b * self.stream_len
            rows.append(np.asarray(self.ids[begin: begin + self.seq_len + 1], dtype=np.int64))
        block = np.stack(rows)  # (B, L+1)
        return block[:, :-1], block[:, 1:]


def eval_windows(ids: np.ndarray, seq_len: int, streams: int, owned: range | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Windows over a whole split, every target scored exactly once.

    The ``len(ids) - 1`` targets are cut into ``streams`` contiguous columns of equal length
    (the last padded with -100, which the loss ignores); each window carries the state of the
    one before it. ``owned`` picks a subset of the columns (one rank's share under DDP).
    """
    targets = len(ids) - 1
    if targets < 1:
        return
    streams = max(1, min(streams, targets))
    column = math.ceil(targets / streams)
    owned = owned if owned is not None else range(streams)
    for start in range(0, column, seq_len):
        length = min(seq_len, column - start)
        x = np.zeros((len(owned), length), dtype=np.int64)
        y = np.full((len(owned), length), -100, dtype=np.int64)
        for row, b in enumerate(owned):
            begin = b * column + start
            end = min(begin + length, targets)
            if end > begin:
                x[row, : end - begin] = ids[begin:end]
                y[row, : end - begin] = ids[begin + 1: end + 1]
        yield x, y
