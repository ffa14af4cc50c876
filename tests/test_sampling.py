"""Sampling: ``sample_logits`` properties, ``model.step`` against ``forward``, and ``Sampler``.

Models are built directly (tiny, random weights) or scripted (a fake model that emits a fixed
token sequence, to pin down stop strings and UTF-8 handling); one tiny byte-level run is trained
once per session. CPU only, a few seconds in all.
"""

from __future__ import annotations

import math
import string

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from textrnn.config import CELLS, ModelConfig, TrainConfig
from textrnn.errors import ConfigError, InputError, TextRNNError
from textrnn.model import RNNLanguageModel
from textrnn.sampling import (Sampler, SamplingError, _cut_at_stop, _TextDecoder, fp16_weights_supported,
                              sample_logits)
from textrnn.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer, iter_training_chunks

CHARS = string.ascii_lowercase + " .,\n"
needs_fp16 = pytest.mark.skipif(not fp16_weights_supported(), reason="no fbgemm fp16 kernels in this build")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def char_sampler(cell: str = "lstm", seed: int = 0, chars: str = CHARS, **config) -> Sampler:
    torch.manual_seed(seed)
    tokenizer = CharTokenizer(chars)
    settings_ = dict(vocab_size=tokenizer.vocab_size, cell=cell, num_layers=2, hidden_size=32, embedding_dim=16,
                     dropout=0.0)
    return Sampler(RNNLanguageModel(ModelConfig(**{**settings_, **config})), tokenizer)


class ScriptedModel(torch.nn.Module):
    """A fake language model: sample b's n-th generated token is ``scripts[b][n]``, at any temperature.

    Its logits are 0 except a large value on the scripted id, so greedy decoding follows the
    script exactly. It records the ids of every ``step`` call, to check batching.
    """

    def __init__(self, scripts: list[list[int]], vocab: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the Sampler a device
        self.scripts, self.vocab = scripts, vocab
        self.calls: list[tuple[int, ...]] = []

    def init_state(self, batch: int, device=None):
        return (torch.zeros(1, batch, 1),)

    def _logits(self, position: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(position.shape[0], self.vocab)
        for row, n in enumerate(position.long().tolist()):
            script = self.scripts[row % len(self.scripts)]
            logits[row, script[min(n, len(script) - 1)]] = 50.0
        return logits

    def forward(self, ids, state):
        position = torch.zeros(ids.shape[0], 1, 1).transpose(0, 1)  # the prompt resets the script
        return self._logits(position[0, :, 0])[:, None].expand(-1, ids.shape[1], -1), (position,)

    def step(self, ids, state, precision="fp32"):
        self.calls.append(tuple(ids.shape))
        position = state[0] + 1
        return self._logits(position[0, :, 0]), (position,)


def watch_steps(model, watch) -> None:
    """Call ``watch(ids)`` before every step the sampler takes with ``model``'s ``stepper``."""
    stepper = model.stepper

    def watched(precision):
        step = stepper(precision)
        return lambda ids, state: (watch(ids), step(ids, state))[1]

    model.stepper = watched


# ---------------------------------------------------------------- sample_logits

@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (2, 0.3)])
def test_temperature_zero_is_argmax(top_k, top_p):
    logits = torch.randn(64, 50, generator=generator(1))
    ids = sample_logits(logits, temperature=0, top_k=top_k, top_p=top_p, generator=generator())
    torch.testing.assert_close(ids, logits.argmax(-1))




def _well_apart(values: list[float]) -> list[float]:
    """Distinct logits, so that "the top k" and "the nucleus" are well defined (no near-ties)."""
    ordered = sorted(values)
    assume(all(b - a > 1e-3 for a, b in zip(ordered, ordered[1:])))
    return values


finite_logits = st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=40, unique=True).map(_well_apart)


@settings(max_examples=60, deadline=None)
@given(finite_logits, st.integers(1, 45), st.floats(0.05, 5.0), st.integers(0, 2**31))
def test_never_outside_the_top_k(values, top_k, temperature, seed):
    logits = torch.tensor(values).expand(300, -1)
    ids = sample_logits(logits, temperature, top_k=top_k, generator=generator(seed))
    allowed = set(torch.topk(logits[0], min(top_k, len(values))).indices.tolist())
    assert set(ids.tolist()) <= allowed


def _nucleus(values: list[float], temperature: float, top_p: float, top_k: int = 0) -> set[int]:
    """The minimal set of most likely ids whose probability reaches top_p (after top-k), in float64."""
    logits = torch.tensor(values, dtype=torch.float64) / temperature
    order = torch.argsort(logits, descending=True)
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(logits[order], -1)
    cumulative = probs.cumsum(-1)
    assume(bool((cumulative - top_p).abs().min() > 1e-4))  # float32 may round either way at the edge
    size = int((cumulative < top_p).sum()) + 1
    return set(order[:size].tolist())


@settings(max_examples=60, deadline=None)
@given(finite_logits, st.floats(0.01, 0.99), st.floats(0.2, 3.0), st.integers(0, 2**31))
def test_never_outside_the_minimal_nucleus(values, top_p, temperature, seed):
    nucleus = _nucleus(values, temperature, top_p)
    ids = sample_logits(torch.tensor(values).expand(300, -1), temperature, top_p=top_p, generator=generator(seed))
    assert set(ids.tolist()) <= nucleus


@settings(max_examples=40, deadline=None)
@given(finite_logits, st.integers(1, 10), st.floats(0.01, 0.99), st.integers(0, 2**31))
def test_top_k_then_top_p_over_what_remains(values, top_k, top_p, seed):
    top_k = min(top_k, len(values) - 1)
    nucleus = _nucleus(values, 1.0, top_p, top_k)
    ids = sample_logits(torch.tensor(values).expand(300, -1), 1.0, top_k=top_k, top_p=top_p, generator=generator(seed))
    assert set(ids.tolist()) <= nucleus


def _chi_square(ids: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(ids, minlength=len(probs)).double()
    expected = probs.double() * len(ids)
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing drawn where the probability is 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8)])
def test_frequencies_match_the_softmax(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    ids = sample_logits(logits.expand(100_000, -1), temperature, top_k, top_p, generator=generator(0))
    scaled = logits / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], -math.inf)
    probs = torch.softmax(scaled.double(), -1)
    if top_p < 1.0:  # p = 0.8: the top two hold 0.77, so the nucleus is the top three (0.89)
        probs[3:] = 0
        probs /= probs.sum()
    # 5 degrees of freedom: the 99.9% point is 20.5; a fixed seed makes the test deterministic
    assert _chi_square(ids, probs) < 20.5


class ConstantModel(ScriptedModel):
    """A fake model whose logits are the same after every token."""

    def __init__(self, logits: torch.Tensor):
        super().__init__([[0]], len(logits))
        self.constant = logits

    def _logits(self, position: torch.Tensor) -> torch.Tensor:
        return self.constant.expand(position.shape[0], -1).clone()


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.6, 0), (1.0, 3)])
def test_sampler_frequencies_match_the_softmax(temperature, top_k):
    """The Sampler's own paths (Gumbel noise in blocks without filters; inverse CDF with them)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.0])  # the last id is the unknown one: never drawn
    tokenizer = CharTokenizer("abcdef")
    sampler = Sampler(ConstantModel(logits), tokenizer)
    text = sampler.generate("a", length=20_000, temperature=temperature, top_k=top_k, seed=0)
    ids = torch.tensor(tokenizer.encode(text))
    scaled = logits[:6] / temperature
    if top_k:
        scaled[top_k:] = -math.inf
    assert _chi_square(ids, torch.softmax(scaled.double(), -1)) < 20.5


def test_a_top_k_beyond_the_vocabulary_is_off():
    logits = torch.randn(20, 10, generator=generator(3))
    off = sample_logits(logits, 1.0, top_k=0, generator=generator(5))
    for k in (10, 11, 1000):
        torch.testing.assert_close(sample_logits(logits, 1.0, top_k=k, generator=generator(5)), off)


def test_the_same_generator_seed_gives_the_same_ids():
    logits = torch.randn(50, 30, generator=generator(2))
    first = sample_logits(logits, 0.9, top_k=10, top_p=0.9, generator=generator(11))
    torch.testing.assert_close(sample_logits(logits, 0.9, top_k=10, top_p=0.9, generator=generator(11)), first)
    assert not torch.equal(sample_logits(logits, 0.9, top_k=10, top_p=0.9, generator=generator(12)), first)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.2), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(repetition_penalty=math.nan), "repetition_penalty"),
])
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_logits(torch.zeros(1, 5), **kwargs)
    assert issubclass(SamplingError, TextRNNError)  # and the CLI turns it into one line


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError, match="batch, vocab"):
        sample_logits(torch.zeros(5))


INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("temperature", [0.0, 1e-3, 1.0, 50.0])
def test_infinite_nan_and_huge_logits(temperature):
    logits = torch.tensor([
        [NAN, INF, 1.0, INF, -INF],  # +inf entries share all the mass
        [-INF, -INF, -INF, -INF, -INF],  # nothing finite: uniform
        [NAN, NAN, 0.0, NAN, NAN],  # NaN never wins
        [3e38, -3e38, 0.0, 1e38, -INF],  # huge values do not overflow, even at a tiny temperature
        [-3e38, -3e38, -3e38, -3.1e38, -3e38],
    ]).repeat(200, 1)
    ids = sample_logits(logits, temperature, generator=generator(0)).view(200, 5)
    assert set(ids[:, 0].tolist()) <= {1, 3}
    assert set(ids[:, 1].tolist()) <= set(range(5))
    assert set(ids[:, 2].tolist()) == {2}
    if temperature < 1:
        assert set(ids[:, 3].tolist()) == {0}
    assert 3 not in set(ids[:, 4].tolist()) or temperature > 1
    if temperature == 1.0:
        assert len(set(ids[:, 1].tolist())) == 5  # uniform really spreads


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.floats(width=32), st.sampled_from([INF, -INF, NAN, 3e38, -3e38])), min_size=1,
                max_size=12),
       st.sampled_from([0.0, 1e-6, 0.5, 1.0, 7.0]), st.integers(0, 12), st.sampled_from([1.0, 0.9, 0.3]),
       st.integers(0, 2**31))
def test_any_logits_give_a_sensible_id(values, temperature, top_k, top_p, seed):
    logits = torch.tensor(values, dtype=torch.float32)
    ids = sample_logits(logits.expand(20, -1), temperature, top_k, top_p, generator=generator(seed))
    assert ids.dtype == torch.int64 and ids.shape == (20,)
    picked = logits[ids]
    assert ((0 <= ids) & (ids < len(values))).all()
    if (logits == INF).any():
        assert (picked == INF).all()
    elif torch.isfinite(logits).any():
        assert torch.isfinite(picked).all()  # never NaN, never -inf while something finite is left
        if temperature == 0:
            assert (picked == logits[torch.isfinite(logits)].max()).all()


def test_repetition_penalty():
    logits = torch.tensor([[3.0, 2.0, -1.0, -2.0]])
    greedy = dict(temperature=0, repetition_penalty=2.0)
    assert sample_logits(logits, **greedy, previous=torch.tensor([[0]])).item() == 1  # 3 / 2 < 2
    assert sample_logits(logits, **greedy, previous=torch.tensor([[0, 1, 0]])).item() == 0  # 1.5 > 1.0
    negative = torch.tensor([[-1.0, -1.5]])
    assert sample_logits(negative, **greedy, previous=torch.tensor([[0]])).item() == 1  # -1 * 2 < -1.5
    assert sample_logits(logits, temperature=0, previous=torch.tensor([[0]])).item() == 0  # 1.0 is off


# ---------------------------------------------------------------- model.step

STEP_CONFIGS = [  # (layers, hidden, embedding): hidden == embedding, hidden > embedding, hidden < embedding
    (1, 24, 24), (2, 32, 16), (3, 16, 24),
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layers,hidden,embedding", STEP_CONFIGS)
def test_step_matches_forward_one_token_at_a_time(cell, tie, layers, hidden, embedding):
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(vocab_size=13, cell=cell, num_layers=layers, hidden_size=hidden,
                                         embedding_dim=embedding, dropout=0.3, tie_weights=tie))
    with torch.no_grad():  # move every weight off its initial pattern (zero biases, orthogonal blocks)
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    model.eval()
    ids = torch.randint(0, 13, (3, 25))
    expected, expected_state = model(ids)  # fused nn.LSTM/GRU/RNN over the whole window
    state = model.init_state(3)
    for t in range(ids.shape[1]):
        before = [s.clone() for s in state]
        logits, new_state = model.step(ids[:, t], state)
        torch.testing.assert_close(logits, expected[:, t], atol=2e-5, rtol=1e-4)
        for old, kept in zip(before, state):
            torch.testing.assert_close(old, kept, atol=0, rtol=0)  # the state passed in is not changed
        state = new_state
    for got, want in zip(state, expected_state):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    step = model.stepper()  # what the sampler loops over: the same function
    with torch.inference_mode():
        logits, _ = step(ids[:, 0], model.init_state(3))
    torch.testing.assert_close(logits, expected[:, 0], atol=2e-5, rtol=1e-4)


@needs_fp16
@pytest.mark.parametrize("cell", CELLS)
def test_fp16_step_is_close_to_forward(cell):
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(vocab_size=13, cell=cell, num_layers=2, hidden_size=32, embedding_dim=16,
                                         dropout=0.0)).eval()
    ids = torch.randint(0, 13, (2, 20))
    expected, _ = model(ids)
    state = model.init_state(2)
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state, precision="fp16")
        torch.testing.assert_close(logits, expected[:, t], atol=5e-3, rtol=1e-2)


def test_step_follows_weight_changes():
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(vocab_size=13, num_layers=2, hidden_size=16, embedding_dim=8)).eval()
    ids = torch.tensor([1, 2])
    before, _ = model.step(ids, model.init_state(2))
    other = RNNLanguageModel(ModelConfig(vocab_size=13, num_layers=2, hidden_size=16, embedding_dim=8))
    model.load_state_dict(other.state_dict())  # in place, still in eval mode
    after, _ = model.step(ids, model.init_state(2))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model(ids[:, None])[0][:, 0], atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # an in-place change to one tensor is seen too
    torch.testing.assert_close(model.step(ids, model.init_state(2))[0], after + 1.0, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- Sampler

def test_same_seed_same_text_and_stream_equals_generate():
    sampler = char_sampler()
    for options in (dict(), dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=0),
                    dict(repetition_penalty=1.3, temperature=1.2), dict(stop=["e", "q"])):
        text = sampler.generate("the cat", length=60, seed=3, **options)
        assert isinstance(text, str)
        assert sampler.generate("the cat", length=60, seed=3, **options) == text
        assert "".join(sampler.stream("the cat", length=60, seed=3, **options)) == text
    assert sampler.generate("the cat", length=60, seed=4) != sampler.generate("the cat", length=60, seed=3)
    assert len(sampler.generate("the cat", length=60, seed=3)) == 60  # char model: length counts characters


def test_a_longer_sample_extends_a_shorter_one():
    sampler = char_sampler("gru")
    short = sampler.generate("ab", length=40, seed=9, temperature=0.9)
    assert sampler.generate("ab", length=90, seed=9, temperature=0.9).startswith(short)


def test_num_samples_gives_distinct_samples_from_one_batch():
    sampler = char_sampler()
    calls = []
    watch_steps(sampler.model, lambda ids: calls.append(tuple(ids.shape)))
    texts = sampler.generate("the", length=30, seed=1, num_samples=4)
    assert isinstance(texts, list) and len(texts) == 4
    assert len(set(texts)) == 4 and all(len(t) == 30 for t in texts)
    assert calls == [(4,)] * 29  # one step per token for the whole batch (none after the last)
    assert sampler.generate("the", length=30, seed=1, num_samples=4) == texts


def test_an_empty_prompt_starts_fresh_after_an_implicit_newline():
    sampler = char_sampler()
    text = sampler.generate("", length=40, seed=2)
    assert len(text) == 40 and sampler.generate("", length=40, seed=2) == text
    assert sampler.generate("\n", length=40, seed=2) == text  # the fresh state reads "\n" first
    no_newline = char_sampler(chars="abc")
    assert len(no_newline.generate("", length=10, seed=0)) == 10  # uniform first token instead


def test_prompt_with_unknown_characters():
    sampler = char_sampler()
    with pytest.raises(InputError, match="prompt: 2 character\\(s\\) not in the vocabulary: 'Q', '\u00e9'"):
        sampler.generate("caf\u00e9 Q", length=5)
    with pytest.raises(InputError):
        sampler.stream("Q", length=5)  # raised at the call, before any text
    assert sampler.generate("caf\u00e9 Q", length=20, seed=1, unknown="skip") == sampler.generate(
        "caf ", length=20, seed=1)


def test_never_generates_the_unknown_id():
    sampler = char_sampler(chars="ab")
    with torch.no_grad():
        sampler.model.head.bias[sampler.tokenizer.unk_id] = 100.0  # the model wants nothing else
    assert "\ufffd" not in sampler.generate("a", length=50, seed=0)


@pytest.mark.parametrize("kwargs,error", [
    (dict(length=-1), ConfigError), (dict(length=10**9), ConfigError), (dict(length=2.5), ConfigError),
    (dict(num_samples=0), ConfigError), (dict(seed=-1), ConfigError), (dict(seed=2**64), ConfigError), (dict(stop=""), ConfigError), (dict(stop=["x", ""]), ConfigError),
    (dict(temperature=-1.0), SamplingError), (dict(top_p=0.0), SamplingError), (dict(unknown="replace"), ConfigError),
])
def test_bad_generate_arguments(kwargs, error):
    sampler = char_sampler()
    with pytest.raises(error):
        sampler.generate("ab", **kwargs)
    if "num_samples" not in kwargs:
        with pytest.raises(error):
            sampler.stream("ab", **kwargs)  # eager: raised before the first piece is asked for


def test_length_zero_gives_empty_text():
    sampler = char_sampler()
    assert sampler.generate("ab", length=0) == ""
    assert sampler.generate("ab", length=0, num_samples=2) == ["", ""]


def test_one_stream_runs_on_one_thread_and_leaves_the_caller_alone():
    sampler = char_sampler()
    threads = torch.get_num_threads()
    seen = []
    watch_steps(sampler.model, lambda ids: seen.append(torch.get_num_threads()))
    for _ in sampler.stream("ab", length=10, seed=0):
        assert torch.get_num_threads() == threads  # the caller's code runs with its own setting
        assert not torch.is_inference_mode_enabled()  # and in its own autograd mode
    assert torch.get_num_threads() == threads
    assert set(seen) == {1}


def test_sampling_leaves_the_global_rng_alone():
    sampler = char_sampler()
    state = torch.random.get_rng_state()
    sampler.generate("ab", length=10)  # no seed: a fresh random one, not from torch's global generator
    assert torch.equal(torch.random.get_rng_state(), state)


@needs_fp16
def test_fp16_sampler():
    fp32 = char_sampler()
    fp16 = Sampler(fp32.model, fp32.tokenizer, precision="fp16")
    text = fp16.generate("the", length=50, seed=5)
    assert len(text) == 50 and fp16.generate("the", length=50, seed=5) == text
    assert "".join(fp16.stream("the", length=50, seed=5)) == text


def test_bad_precision():
    sampler = char_sampler()
    with pytest.raises(ConfigError, match="precision"):
        Sampler(sampler.model, sampler.tokenizer, precision="bf16")


# ---------------------------------------------------------------- stop strings

def scripted_char_sampler(texts: list[str], chars: str = CHARS) -> Sampler:
    tokenizer = CharTokenizer(chars)
    return Sampler(ScriptedModel([tokenizer.encode(t) for t in texts], tokenizer.vocab_size), tokenizer)


def test_stop_string_is_kept_at_the_end_and_ends_the_sample():
    sampler = scripted_char_sampler(["abc\n\nxyz abc"])
    assert sampler.generate("", length=12, temperature=0) == "abc\n\nxyz abc"
    assert sampler.generate("", length=12, temperature=0, stop="\n\n") == "abc\n\n"
    assert sampler.generate("", length=12, temperature=0, stop=["z", "\n"]) == "abc\n"  # the earliest ends it
    assert sampler.generate("", length=12, temperature=0, stop="not there") == "abc\n\nxyz abc"
    assert list(sampler.stream("", length=12, temperature=0, stop="c\n\nx")) == list("abc\n\nx")
    model = sampler.model
    model.calls.clear()
    sampler.generate("", length=12, temperature=0, stop="b")
    assert len(model.calls) == 1  # generation stops with the stop string, not at length


def test_stop_strings_in_a_batch_end_each_sample_on_its_own():
    sampler = scripted_char_sampler(["ab.cd.ef", "abcdef.g", "abcdefgh"])
    texts = sampler.generate("", length=8, temperature=0, num_samples=3, stop=".")
    assert texts == ["ab.", "abcdef.", "abcdefgh"]


def test_stop_string_split_across_multi_character_pieces():
    assert _cut_at_stop("xx", "yy", ["zz"]) == ("yy", False)
    assert _cut_at_stop("ab\n", "\ncd", ["\n\n"]) == ("\n", True)  # began in the tail, ends in the piece
    assert _cut_at_stop("", "one. two. ", [". "]) == ("one. ", True)
    assert _cut_at_stop("a. ", "b", [". "]) == ("b", False)  # a stop wholly in the tail was seen before
    assert _cut_at_stop("q", "rst", ["st", "qr"]) == ("r", True)  # the earliest end wins


# ---------------------------------------------------------------- complete characters only

TEXT = "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 \u20ac!"


def test_byte_stream_yields_only_whole_characters():
    tokenizer = ByteTokenizer()
    data = list(TEXT.encode("utf-8"))
    sampler = Sampler(ScriptedModel([data], 256), tokenizer)
    pieces = list(sampler.stream("", length=len(data), temperature=0))
    assert "".join(pieces) == TEXT
    assert all(p.encode("utf-8").decode("utf-8") == p and "\ufffd" not in p for p in pieces)
    assert "\U0001F600" in pieces  # four bytes, one piece
    # a character cut off by the length limit is dropped, not shown as U+FFFD
    assert sampler.generate("", length=len("caf\u00e9 ".encode()) + 2, temperature=0) == "caf\u00e9 "


def test_byte_stream_marks_invalid_bytes_like_decode():
    sampler = Sampler(ScriptedModel([[0x61, 0xFF, 0x62, 0xE6, 0x62]], 256), ByteTokenizer())
    assert sampler.generate("", length=5, temperature=0) == ByteTokenizer().decode([0x61, 0xFF, 0x62, 0xE6, 0x62])


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> SentencePieceTokenizer:
    corpus = "".join(f"the cat sat on the mat {n}. na\u00efve caf\u00e9\n" for n in range(200))
    return SentencePieceTokenizer.train(list(iter_training_chunks([corpus])), "bpe", 300, large_alphabet=False)


def test_sentencepiece_stream_yields_only_whole_characters(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    ids = tokenizer.encode(TEXT + " the mat\n")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # byte-fallback pieces are in the script
    sampler = Sampler(ScriptedModel([ids], tokenizer.vocab_size), tokenizer)
    pieces = list(sampler.stream("", length=len(ids), temperature=0))
    assert "".join(pieces) == TEXT + " the mat\n"
    assert all("\ufffd" not in p for p in pieces)
    decoder = _TextDecoder(tokenizer)
    cut = [decoder.push(i) for i in tokenizer.encode("caf\u00e9 \U0001F600")[:-1]]
    assert "".join(cut) + decoder.flush() == "caf\u00e9 "  # the half emoji at the end is dropped


def test_stop_string_across_sentencepiece_pieces(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    ids = tokenizer.encode("the cat sat on the mat\n")
    assert "t s" not in [tokenizer.decode([i]) for i in ids]  # the stop string spans pieces
    sampler = Sampler(ScriptedModel([ids], tokenizer.vocab_size), tokenizer)
    assert sampler.generate("", length=len(ids), temperature=0, stop="t s") == "the cat s"
    assert "".join(sampler.stream("", length=len(ids), temperature=0, stop="t s")) == "the cat s"


@pytest.fixture(scope="session")
def byte_run(tmp_path_factory):
    """A tiny byte-level run, trained once, on text full of multibyte characters."""
    from textrnn.training import train

    root = tmp_path_factory.mktemp("byte-run")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"{n} caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \u20ac\U0001F600 \u00fcber\n"
                              for n in range(150)), encoding="utf-8")
    result = train([corpus], root / "run", ModelConfig(num_layers=1, hidden_size=32, embedding_dim=16),
                   TrainConfig(max_steps=30, batch_size=8, seq_len=32, eval_every=30, lr=1e-2, warmup_steps=3,
                               device="cpu"), tokenizer="byte")
    return result.run_dir


def test_trained_byte_model_streams_whole_characters(byte_run, monkeypatch):
    import textrnn.sampling as sampling

    sampler = Sampler.from_checkpoint(byte_run, device="cpu")
    assert sampler.tokenizer.kind == "byte"
    push = sampling._TextDecoder.push
    for seed in range(3):
        drawn: list[int] = []  # every id the sampler draws goes through its decoder
        monkeypatch.setattr(sampling._TextDecoder, "push", lambda self, token: (drawn.append(token), push(self, token))[1])
        pieces = list(sampler.stream("caf", length=300, seed=seed, temperature=1.2))
        monkeypatch.setattr(sampling._TextDecoder, "push", push)
        text = "".join(pieces)
        assert text == sampler.generate("caf", length=300, seed=seed, temperature=1.2)
        # pieces never split a character: together they decode like all the bytes at once,
        # except that a character cut off at the end is left out
        full = ByteTokenizer().decode(drawn)
        assert len(drawn) == 300 and text in (full, full[:-1])
        assert text == full or full.endswith("\ufffd")
        assert "\ufffd" not in text or any(b >= 0x80 for b in drawn)


def test_a_held_sampler_follows_fused_adamw_steps():
    """Fused AdamW writes the weights in place without bumping their versions; a held sampler still sees them."""
    import copy

    sampler = char_sampler("lstm", seed=3)
    model = sampler.model  # eval mode throughout (no dropout here), as a sampler held by a training loop sees it
    before = sampler.generate("ab", length=200, seed=1)  # builds the step cache
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, len(CHARS), (4, 16), generator=generator(0))
    versions = [p._version for p in model.parameters()]
    for _ in range(20):
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [p._version for p in model.parameters()] == versions  # what hid the change before
    fresh = Sampler(copy.deepcopy(model), sampler.tokenizer)
    expected = fresh.generate("ab", length=200, seed=1)
    assert expected != before
    assert sampler.generate("ab", length=200, seed=1) == expected


def test_the_unseen_character_message_speaks_python():
    with pytest.raises(InputError, match=r"pass unknown='skip' to drop them") as info:
        char_sampler().generate("aQb", length=5)
    assert "--unknown" not in str(info.value)
