"""Properties that must hold for every input, checked with hypothesis.

Tokenizers round-trip arbitrary Unicode (``char``, ``byte``, and the chunked reader that feeds
them, whatever the chunk size); ``sample_logits`` returns a valid id for any logits, NaN, +-inf
and huge values included, never one whose logit is -inf while another is not, and is argmax at
temperature 0; and the parsers that read user input (durations, configs, safetensors) raise
only their own errors, never a traceback.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from textrnn.checkpoint import load_tensors
from textrnn.config import ModelConfig, TrainConfig, parse_duration
from textrnn.data import read_chunks
from textrnn.errors import CheckpointError, ConfigError, InputError
from textrnn.sampling import sample_logits
from textrnn.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FILE_SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# str.splitlines() breaks text at these; nothing in textrnn may
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
unicode_text = st.text(st.characters(codec="utf-8") | st.sampled_from(LINE_BREAKS + "\r\n\ufeff"))


# ---------------------------------------------------------------- tokenizers

@SETTINGS
@given(text=unicode_text)
def test_char_tokenizer_round_trips_any_text(text: str) -> None:
    tokenizer = CharTokenizer(text or "a")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size - 1 for i in ids)  # the unknown id never appears
    assert tokenizer.encode_array(text).tolist() == ids


@SETTINGS
@given(vocabulary=unicode_text.filter(bool), text=unicode_text)
def test_char_tokenizer_unknown_characters(vocabulary: str, text: str) -> None:
    tokenizer = CharTokenizer(vocabulary)
    known = set(vocabulary)
    assert tokenizer.decode(tokenizer.encode(text, unknown="skip")) == "".join(c for c in text if c in known)
    assert tokenizer.decode(tokenizer.encode(text, unknown="unk")) == "".join(
        c if c in known else "\ufffd" for c in text)
    if set(text) <= known:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    else:
        with pytest.raises(InputError, match="not in the vocabulary"):
            tokenizer.encode(text)


@SETTINGS
@given(text=unicode_text)
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text


@SETTINGS
@given(data=st.binary())
def test_byte_tokenizer_round_trips_any_bytes(data: bytes) -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode_bytes(tokenizer.encode(data)) == data
    assert tokenizer.decode(tokenizer.encode(data)) == data.decode("utf-8", "replace")


@FILE_SETTINGS
@given(chars=unicode_text.filter(bool))
def test_a_saved_char_vocabulary_loads_back_the_same(tmp_path_factory, chars: str) -> None:
    directory = tmp_path_factory.mktemp("tokenizer")
    CharTokenizer(chars).save(directory)
    loaded = load_tokenizer(directory)
    assert loaded.kind == "char" and loaded.chars == CharTokenizer(chars).chars


# ---------------------------------------------------------------- reading text in chunks

@FILE_SETTINGS
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\x00") | st.sampled_from("\r\n\ufeff")),
       bom=st.booleans(), chunk_bytes=st.integers(1, 9), keep=st.booleans())
def test_chunked_reading_gives_the_whole_text_for_any_chunk_size(tmp_path_factory, text: str, bom: bool,
                                                                  chunk_bytes: int, keep: bool) -> None:
    written = ("\ufeff" if bom else "") + text
    path = tmp_path_factory.mktemp("read") / "text.txt"
    path.write_bytes(written.encode("utf-8"))
    read = "".join(read_chunks(path, newline="keep" if keep else "lf", chunk_bytes=chunk_bytes))
    expected = written.removeprefix("\ufeff")  # one byte-order mark, at the very start, is dropped
    assert read == (expected if keep else expected.replace("\r\n", "\n"))


@FILE_SETTINGS
@given(before=st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
       after=st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
       bad=st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"]), chunk_bytes=st.integers(1, 9))
def test_invalid_utf8_is_reported_at_its_byte_offset_for_any_chunk_size(
        tmp_path_factory, before: str, after: str, bad: bytes, chunk_bytes: int) -> None:
    assume(not (bad in (b"\xc3", b"\xe2\x82") and after[:1] and 0x80 <= ord(after[0]) < 0xC0))
    prefix = before.encode("utf-8")
    path = tmp_path_factory.mktemp("bad") / "text.txt"
    path.write_bytes(prefix + bad + ("!" + after).encode("utf-8"))  # "!" ends any cut sequence
    with pytest.raises(InputError, match=rf"invalid UTF-8 at byte {len(prefix)}\b"):
        "".join(read_chunks(path, chunk_bytes=chunk_bytes))


# ---------------------------------------------------------------- sampling

logit = st.floats(width=32) | st.sampled_from([math.inf, -math.inf, math.nan, 3.4e38, -3.4e38, 0.0, 1e-45])
logit_rows = arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 12)), elements=logit)
temperatures = st.just(0.0) | st.floats(0.0, 1e4, exclude_min=True) | st.sampled_from([5e-324, 1e-30, 1.0])


@SETTINGS
@given(logits=logit_rows, temperature=temperatures, top_k=st.integers(0, 14),
       top_p=st.floats(0.0, 1.0, exclude_min=True) | st.just(1.0), seed=st.integers(0, 2**32))
def test_sample_logits_always_returns_a_sensible_id(logits: np.ndarray, temperature: float, top_k: int,
                                                    top_p: float, seed: int) -> None:
    def sample() -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        ids = sample_logits(torch.from_numpy(logits.copy()), temperature, top_k, top_p, generator=generator)
        assert ids.shape == (logits.shape[0],) and ids.dtype == torch.int64
        return ids.tolist()

    ids = sample()
    assert sample() == ids  # the same seed, the same ids
    for row, chosen in zip(logits, ids):
        clean = np.where(np.isnan(row), -np.inf, row)  # NaN counts as -inf: never chosen over a number
        assert 0 <= chosen < len(row)
        if (clean > -np.inf).any():
            assert clean[chosen] > -np.inf, f"picked a -inf logit from {row}"
        if (clean == np.inf).any():
            assert clean[chosen] == np.inf, f"+inf must win outright in {row}"
        if temperature == 0:
            assert chosen == int(np.argmax(clean)), f"greedy is not argmax for {row}"
        elif top_k == 1:
            assert clean[chosen] == clean.max()


# ---------------------------------------------------------------- parsers of user input

@SETTINGS
@given(text=st.text() | st.from_regex(r"\A\d{0,3}(\.\d)?h?\d{0,3}m?\d{0,3}(\.\d+)?s?\Z"))
def test_a_duration_parses_to_a_positive_number_or_a_config_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ConfigError:
        return
    assert seconds > 0 and math.isfinite(seconds)


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=5)


@SETTINGS
@given(model=st.dictionaries(st.sampled_from(sorted(ModelConfig.__dataclass_fields__) + ["evil"]), json_value),
       train=st.dictionaries(st.sampled_from(sorted(TrainConfig.__dataclass_fields__) + ["evil"]), json_value))
def test_any_json_config_is_a_config_or_a_config_error(model: dict, train: dict) -> None:
    for cls, data in ((ModelConfig, model), (TrainConfig, train)):
        try:
            config = cls.from_dict(data, source="config.json")
        except ConfigError as exc:
            assert str(exc)
        else:
            assert cls.from_dict(config.to_dict()) == config


@FILE_SETTINGS
@given(data=st.binary(max_size=300) | st.builds(lambda n, rest: n.to_bytes(8, "little") + rest,
                                                 st.integers(0, 2**64 - 1), st.binary(max_size=200)))
def test_any_bytes_are_tensors_or_a_checkpoint_error(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("tensors") / "model.safetensors"
    path.write_bytes(data)
    try:
        tensors = load_tensors(path)
    except CheckpointError as exc:
        assert "model.safetensors" in str(exc)
    else:
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
