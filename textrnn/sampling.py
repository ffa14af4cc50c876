"""Sampling: ``sample_logits`` (pure, tensors only) and ``Sampler`` (model + tokenizer + state).

A prompt is primed with one forward pass over all of it; then each new token costs one call of
the model's single-token ``step``, under ``torch.inference_mode()``, with every sample of a call
in one batch. Streams yield only complete characters, so byte and SentencePiece models never emit
broken UTF-8. Loading a run lives in ``checkpoint.py``; printing lives in ``cli.py``.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import itertools
import math
import numbers
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_run
from .errors import ConfigError, InputError, TextRNNError
from .runtime import resolve_device
from .tokenizers import Tokenizer

MAX_LENGTH = 10_000_000  # tokens per call: far beyond any sensible sample, far below running out of memory
_GREEDY_BELOW = 1e-30  # temperatures this small are greedy (and would overflow logits / temperature)
# precision="auto" samples with fp16 weights on x86 CPUs from this model size on: at batch 1 each
# token reads every weight, and fp16 halves the bytes, which pays once they no longer fit in the
# caches; below it (the small preset's 0.7M) fbgemm's fp16 kernels are slower than fp32 ones
FP16_FROM_PARAMETERS = 2_000_000
SCORE_CHUNK = 4096  # tokens per forward pass when scoring a text
_DRAW_BLOCK = 1024  # uniform numbers drawn per generator call: one call per token would cost more than the draw


ENGINES = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "fp16", "int8")


class SamplingError(TextRNNError, ValueError):
    """A sampling setting out of range (a ValueError too, for code that catches that)."""


class UnknownCharactersError(InputError):
    """Prompt characters outside a char vocabulary; ``detail`` names them, the message says what to do in Python."""

    def __init__(self, detail: str):
        self.detail = detail
        super().__init__(f"prompt: {detail}; pass unknown='skip' to drop them")


def _real(value) -> float | None:
    """``value`` as a float if it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check_sampling_args(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0) -> None:
    """Raise SamplingError (a ValueError) naming the first setting that is out of range."""
    t = _real(temperature)
    if t is None or math.isnan(t) or t < 0:
        raise SamplingError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if math.isinf(t):
        raise SamplingError("temperature must be finite (0 = greedy), got inf")
    try:
        k = operator.index(top_k) if not isinstance(top_k, bool) else -1
    except TypeError:
        k = -1
    if k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    p = _real(top_p)
    if p is None or math.isnan(p) or not 0.0 < p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    r = _real(repetition_penalty)
    if r is None or math.isnan(r) or math.isinf(r) or r <= 0:
        raise SamplingError(f"repetition_penalty must be a positive number (1 = off), got {repetition_penalty!r}")


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, repetition_penalty: float = 1.0,
                  previous: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one id per row of ``logits`` [B, V]; returns [B] int64.

    Temperature 0 is greedy (argmax). Top-k keeps the k largest logits (0, or k >= V, is off);
    top-p then keeps the smallest set of the remaining tokens, most likely first, whose
    probability reaches p (1 is off). ``repetition_penalty`` > 1 divides the positive logits
    (multiplies the negative ones) of the ids in ``previous`` [B, N], as in CTRL.

    Odd logits are handled, not raised on: NaN never wins; a row with +inf picks among its +inf
    entries; a row that is all -inf (or NaN) is uniform; huge finite values do not overflow.
    """
    _check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [batch, vocab] with vocab >= 1, got shape {tuple(logits.shape)}")
    logits = logits.float()
    if repetition_penalty != 1.0 and previous is not None and previous.numel():
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, previous.to(logits.device, torch.int64), True)
        logits = _penalize(logits, seen, repetition_penalty)
    return _sample(_make_safe(logits), float(temperature), int(top_k), float(top_p), generator)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on the ids marked in ``seen`` [B, V]."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _make_safe(logits: torch.Tensor) -> torch.Tensor:
    """Logits whose row maximum is 0 and finite, so that any temperature and softmax behave.

    NaN becomes -inf (never chosen); in a row with +inf entries those share all the probability
    (the limit of huge logits); a row with nothing finite left becomes uniform.
    """
    if not bool(torch.isfinite(logits).all()):
        logits = torch.nan_to_num(logits, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        pos_inf = logits == math.inf
        logits = torch.where(pos_inf.any(-1, keepdim=True), torch.where(pos_inf, 0.0, -math.inf), logits)
        logits = torch.where(torch.isneginf(logits).all(-1, keepdim=True), 0.0, logits)
    return logits - logits.amax(-1, keepdim=True)  # huge values / a small temperature stay finite


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None, draw: torch.Tensor | None = None,
            noise: torch.Tensor | None = None) -> torch.Tensor:
    """The sampling rule on checked arguments and safe logits [B, V] (see ``_make_safe``).

    Draws by inverse CDF: one uniform number per row (``draw`` [B, 1] in (0, 1], or fresh from
    ``generator``) against the running sum of the kept probabilities. It is exact, costs a
    handful of small ops, and cannot pick a token of probability 0: the pick is clamped to the
    last kept token of each row. Without filters, ``noise`` [B, V] from ``_gumbel_noise`` may
    be given instead (the Sampler's fast path): then it is the Gumbel-max draw, two ops.
    """
    if temperature < _GREEDY_BELOW:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else 0
    if k == 0 and top_p >= 1.0 and noise is not None:
        return (logits + noise).argmax(-1)  # argmax(logits / T + Gumbel) is a draw from softmax(logits / T)
    if draw is None:
        draw = 1.0 - torch.rand(logits.shape[0], 1, generator=generator, device=logits.device)  # (B, 1) in (0, 1]
    order, probs, last = _filter(logits, temperature, k, top_p)
    choice = _inverse_cdf(probs, draw, last)  # a position in ``order``
    return choice if order is None else order.gather(-1, choice[:, None]).squeeze(-1)


def _filter(logits: torch.Tensor, temperature: float, k: int, top_p: float
            ) -> tuple[torch.Tensor | None, torch.Tensor, int | torch.Tensor]:
    """(order, probs, last): the ids by rank [B, N] (None: unfiltered, the vocabulary's own order),
    their probabilities after temperature, top-k (``k`` > 0) and top-p (0 past the kept tokens,
    not renormalised), and the last kept position (an int or [B, 1])."""
    vocab = logits.shape[-1]
    if k == 0 and top_p >= 1.0:  # no filter: the common case, kept short
        return None, torch.softmax(logits / temperature if temperature != 1.0 else logits, -1), vocab - 1
    if k:
        values, order = torch.topk(logits, k, dim=-1)  # (B, k), most likely first
    else:
        values, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(values / temperature, -1)
    last = k - 1 if k else vocab - 1
    if top_p < 1.0:
        # a token stays if the tokens ranked above it hold less than top_p: the minimal nucleus
        above = probs.cumsum(-1) - probs
        # (B, 1); the top token always stays, even for a top_p that is 0 in float32 (say 1e-50)
        last = ((above < top_p).sum(-1, keepdim=True) - 1).clamp_(min=0)
        probs = probs.masked_fill(torch.arange(probs.shape[-1], device=probs.device) > last, 0.0)
    return order, probs, last


def filtered_probabilities(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``sample_logits`` draws from, per row of ``logits`` [B, V]: (ids, probabilities), each [B, V].

    The ids run most likely first (ties: the lower id first); the probabilities are those of
    ``sample_logits``'s rule, renormalised over the kept tokens, and 0 past them. Greedy
    (temperature 0) keeps the argmax alone. The reference that other samplers (textrnn.js) match.
    """
    _check_sampling_args(temperature, top_k, top_p)
    logits = _make_safe(logits.float())
    vocab = logits.shape[-1]
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices  # (B, V)
    if temperature < _GREEDY_BELOW:
        probs = torch.zeros_like(logits)
        probs[:, 0] = 1.0
        return order, probs
    k = top_k if 0 < top_k < vocab else 0
    kept_order, probs, _ = _filter(logits, float(temperature), k, float(top_p))
    dense = probs if kept_order is None else torch.zeros_like(logits).scatter_(1, kept_order, probs)
    ranked = dense.gather(1, order)
    return order, ranked / ranked.sum(-1, keepdim=True)


def _gumbel_noise(shape: tuple[int, ...], temperature: float, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """``temperature`` times standard Gumbel noise, float32: argmax(logits + noise) samples softmax(logits / T).

    Drawn in float64 (as -log of an exponential variable, kept away from 0) so that no noise
    value is infinite and no probability is rounded to a coarse grid.
    """
    exponential = torch.empty(shape, dtype=torch.float64, device=device).exponential_(generator=generator)
    return exponential.clamp_(min=1e-300).log_().mul_(-temperature).float()


def _inverse_cdf(probs: torch.Tensor, draw: torch.Tensor, last: int | torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` [B, N] (non-negative, some mass), the first index whose running sum
    reaches ``draw`` [B, 1] in (0, 1] of the row's total; at most ``last`` (an int or [B, 1])."""
    cdf = probs.cumsum(-1)  # (B, N)
    choice = (cdf < draw * cdf[:, -1:]).sum(-1)  # the target is > 0, so a leading zero is never picked
    if isinstance(last, int):
        return choice.clamp_(max=last)
    return torch.minimum(choice, last.squeeze(-1))


class _TextDecoder:
    """Turns a sample's ids, one at a time, into text pieces that hold only complete characters.

    A byte model's pieces go through an incremental UTF-8 decoder (an invalid sequence becomes
    U+FFFD, as ``ByteTokenizer.decode`` does); a SentencePiece model's pending ids are held back
    while they end in part of a character. A character cut off by the end of the sample is
    dropped, not shown as U+FFFD.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = tokenizer.kind
        if self.kind == "byte":
            self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        if self.kind == "char":
            return self.tokenizer.decode([token])
        if self.kind == "byte":
            return self._bytes.decode(bytes([token]))
        self._pending.append(token)
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd"):  # maybe the first bytes of a character: wait for the rest
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """The text still held back that is whole; a trailing partial character is dropped."""
        if self.kind in ("char", "byte") or not self._pending:
            return ""
        text, self._pending = self.tokenizer.decode(self._pending), []
        return text.rstrip("\ufffd")


class Sampler:
    """Generate text from a trained model.

    >>> sampler = Sampler.from_checkpoint("runs/shakespeare")
    >>> sampler.generate("ROMEO:", length=200, temperature=0.8, seed=7)

    ``length`` counts tokens (characters for a char model) after the prompt; the returned text
    does not repeat the prompt. A stop string ends a sample when it appears in the generated text
    (even across token boundaries) and is kept: the sample ends with it. The same seed gives the
    same text, and ``"".join(stream(...)) == generate(...)`` for the same arguments; a longer
    ``length`` extends the text of a shorter one. ``repetition_penalty`` applies to every id in
    the prompt and the sample so far. A char model never generates its unknown id.

    On a CPU, one stream (batch 1) of the torch engine runs its steps on a single thread,
    whatever torch's setting: its matrix-vector products gain little from a second thread and
    stall when another process keeps that core busy. The thread count is restored around every
    step. The onnxruntime engine runs one stream on the cores found idle when it starts (up to
    torch's count), where its int8 step gains up to 1.9x from a second one.

    ``engine`` runs the per-token step: ``"torch"`` (the model's own ``step``), ``"onnxruntime"``
    (the step exported to ONNX, ``pip install 'textrnn[onnx]'``), or ``"auto"``: onnxruntime
    where it is installed and, timed on this machine for this model and batch size, faster.
    Both give the same text for a seed, to float rounding. ``precision="int8"`` runs the step
    on onnxruntime with int8 weights (``export.quantized_graph``): the fastest batch-1 path for
    large models, whose logits move (the validation loss by about 1e-4), so its text for a seed
    is its own (repeatable, but not fp32's). The weights are read at each call,
    so a sampler held across training follows them (any optimizer step, fused ones included).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | str | None = None,
                 config: dict | None = None, precision: str = "auto", engine: str = "torch",
                 run_dir: str | os.PathLike | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.config = config or {}
        if engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "onnxruntime":
            from .export import onnx_available

            if not onnx_available():
                raise ConfigError("engine onnxruntime needs the onnx extra: pip install 'textrnn[onnx]'")
            if self.device.type != "cpu" or not hasattr(model, "rnn"):
                raise ConfigError(f"engine onnxruntime runs textrnn models on the CPU; this is {self.device.type}")
        self.engine = engine
        self.engine_used: str | None = None  # the engine of the latest call (auto's choice)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._run_weights_key = model.weights_key() if run_dir is not None and hasattr(model, "weights_key") else None
        self._onnx: tuple | None = None  # (weights key, OnnxStepper)
        self._auto_choice: dict[tuple, str] = {}
        if precision == "auto":  # fp16 pays once the weights outgrow the caches (BENCHMARKS.md)
            big = sum(p.numel() for p in model.parameters()) >= FP16_FROM_PARAMETERS
            precision = "fp16" if big and self.device.type == "cpu" and fp16_weights_supported() else "fp32"
        if precision not in PRECISIONS[1:]:
            raise ConfigError(f"sampling precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and not (self.device.type == "cpu" and fp16_weights_supported()):
            raise ConfigError(f"fp16 sampling weights need an x86 CPU (fbgemm); this is {self.device.type}, "
                              f"use precision fp32")
        if precision == "int8":
            from .export import onnx_available

            if engine == "torch":
                raise ConfigError("int8 sampling weights run on the onnxruntime engine, not torch")
            if not onnx_available():
                raise ConfigError("int8 sampling weights need the onnx extra: pip install 'textrnn[onnx]'")
            if self.device.type != "cpu" or not hasattr(model, "rnn"):
                raise ConfigError(f"int8 sampling weights run textrnn models on the CPU; this is {self.device.type}")
        self.precision = precision

    @classmethod
    def from_checkpoint(cls, run_dir: str | os.PathLike, device: str = "auto", precision: str = "auto",
                        engine: str = "auto", weights: str = "best") -> "Sampler":
        """A sampler for the best weights of a run directory (``weights="last"``: those of ``last/``).

        ``device="auto"`` picks cuda, then mps, then cpu. ``precision="auto"`` is fp16 on x86 CPUs
        for models of 2M parameters or more, and fp32 otherwise: fp16 copies of the recurrent
        weights (accumulated in fp32) make a large model's sampling about 1.5x faster at batch 1,
        with logits within about 1e-3 of fp32, so a seed gives slightly different text than
        under ``precision="fp32"`` (each is repeatable on its own). ``precision="int8"`` is an
        explicit choice, described on the class.

        ``engine`` is described on the class; onnxruntime's export of the step is cached in
        ``RUN_DIR/onnx/`` and reused until the run's weights change.
        """
        if weights not in ("best", "last"):
            raise ConfigError(f"weights must be best or last, got {weights!r}")
        run = load_run(run_dir, resolve_device(device), weights)
        # the run's ONNX cache holds its best weights: last/'s are exported afresh
        return cls(run.model, run.tokenizer, run.device, run.config, precision, engine,
                   run_dir=run_dir if weights == "best" else None)

    def encode_prompt(self, prompt: str, unknown: str = "error") -> list[int]:
        """Prompt ids; characters outside a char vocabulary raise InputError (``unknown="skip"`` drops them)."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
        if unknown not in ("error", "skip"):
            raise ConfigError(f"unknown must be 'error' or 'skip', got {unknown!r}")
        try:
            return list(self.tokenizer.encode(prompt, unknown=unknown))
        except InputError as exc:
            raise UnknownCharactersError(str(exc)) from None

    def generate(self, prompt: str = "", length: int = 500, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, num_samples: int = 1,
                 stop: str | Sequence[str] | None = None, repetition_penalty: float = 1.0,
                 unknown: str = "error") -> str | list[str]:
        """``num_samples`` continuations of ``prompt``, sampled as one batch: a str, or a list when num_samples > 1."""
        pieces = self._pieces(*self._setup(prompt, length, temperature, top_k, top_p, seed, num_samples, stop,
                                           repetition_penalty, unknown))
        texts: list[list[str]] = [[] for _ in range(num_samples)]
        for index, piece, _ in pieces:
            texts[index].append(piece)
        joined = ["".join(t) for t in texts]
        return joined[0] if num_samples == 1 else joined

    def stream(self, prompt: str = "", length: int = 500, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
               repetition_penalty: float = 1.0, unknown: str = "error",
               logprobs: int | None = None) -> Iterator[str] | Iterator[tuple[str, list[Logprob]]]:
        """Yield the text of one sample piece by piece as it is made.

        With ``logprobs=N`` each item is ``(piece, [Logprob, ...])``: the log-probability (nats,
        under the model itself, before temperature, filters and penalty) of each token whose
        text the piece completes, with the N most likely tokens at its place. The same seed
        gives the same text with or without it. The arguments are checked and the prompt
        encoded when ``stream`` is called, so a bad setting raises here, before any text is yielded.
        """
        if logprobs is not None:
            logprobs = _count("logprobs", logprobs, 0)
        pieces = self._pieces(*self._setup(prompt, length, temperature, top_k, top_p, seed, 1, stop,
                                           repetition_penalty, unknown), logprobs)
        if logprobs is None:
            return (piece for _, piece, _ in pieces)
        return ((piece, entries) for _, piece, entries in pieces)

    def score(self, text: str, top: int = 0, unknown: str = "error", chunk: int = SCORE_CHUNK) -> "Scores":
        """The log-probability (nats) of every token of ``text`` under the model, read from a fresh state.

        The first token has no context, so its log-probability is None (as OpenAI's API and
        ``textrnn evaluate`` have it); token ``i`` is scored from tokens ``0..i-1``. ``top`` > 0
        also returns that many most likely tokens at each position. The text runs as one stateful
        forward pass, ``chunk`` tokens at a time, so long texts cost little memory.
        """
        top = _count("top", top, 0)
        ids = self.encode_prompt(text, unknown)
        logprobs: list[float | None] = [None] * min(len(ids), 1)
        tops: list[dict[str, float] | None] = [None] * min(len(ids), 1)
        with torch.inference_mode():
            for log_probs in forward_log_probs(self.model, ids, self.device, chunk):  # (T, V) per chunk
                start = len(logprobs)
                targets = torch.tensor(ids[start:start + len(log_probs)], device=self.device)
                log_probs = log_probs[:len(targets)]
                logprobs.extend(log_probs.gather(1, targets[:, None]).squeeze(1).tolist())
                if top:
                    tops.extend(top_tokens(self.tokenizer, log_probs, top))
        return Scores(ids, token_texts(self.tokenizer, ids), logprobs, tops if top else None)

    def _setup(self, prompt, length, temperature, top_k, top_p, seed, num_samples, stop, repetition_penalty,
               unknown) -> tuple:
        """Check every argument and encode the prompt, eagerly (before any generator starts)."""
        _check_sampling_args(temperature, top_k, top_p, repetition_penalty)
        length = _count("length", length, 0)
        num_samples = _count("num_samples", num_samples, 1)
        if length > MAX_LENGTH:
            raise ConfigError(f"length {length:,} is more than the limit of {MAX_LENGTH:,} tokens per call; "
                              f"generate in several calls")
        if seed is not None and not 0 <= _count("seed", seed, 0) < 2**64:
            raise ConfigError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError("stop strings must be non-empty strings")
        ids = self.encode_prompt(prompt, unknown)
        return (ids, length, float(temperature), int(top_k), float(top_p), seed, num_samples, stops,
                float(repetition_penalty))

    def _first_logits(self, ids: list[int], num_samples: int) -> tuple[torch.Tensor, tuple]:
        """Logits [B, V] for the first new token and the state after the prompt, from one forward pass.

        The prompt runs once at batch 1 and its state is copied to every sample. An empty prompt
        starts from a fresh (zero) state; as the model has no start-of-text token, it reads an
        implicit newline first (not emitted) when the vocabulary has one, since text after a line
        break is the most natural start. Without a newline the first token is uniform.
        """
        model, device = self.model, self.device
        state = model.init_state(1, device)
        if not ids:
            try:
                newline = list(self.tokenizer.encode("\n"))
            except TextRNNError:
                newline = []
            if len(newline) != 1:
                logits = torch.zeros(num_samples, self.tokenizer.vocab_size, device=device)
                return logits, model.init_state(num_samples, device)
            ids = newline
        logits, state = model(torch.tensor([ids], device=device), state)  # (1, T, V): one pass over the prompt
        logits = logits[:, -1].float().expand(num_samples, -1)
        state = tuple(s.expand(-1, num_samples, -1).contiguous() for s in state)
        return logits, state

    def _pieces(self, ids, length, temperature, top_k, top_p, seed, num_samples, stops,
                repetition_penalty, logprobs=None) -> Iterator[tuple[int, str, list[Logprob]]]:
        """Yield (sample index, text piece, the log-probabilities of its tokens) as tokens are made;
        arguments already checked. The list is empty unless ``logprobs`` (top tokens per place) is given."""
        if length == 0:
            return
        plan = self._plan(temperature, top_k, top_p, seed, num_samples, repetition_penalty, logprobs)
        outputs = _Outputs(self.tokenizer, num_samples, stops)
        draws = noise = seen = None
        held: list[Logprob] = []  # log-probabilities of tokens whose text is not out yet
        with torch.inference_mode():
            logits, state = self._first_logits(ids, num_samples)
            if repetition_penalty != 1.0:
                seen = torch.zeros(num_samples, self.tokenizer.vocab_size, dtype=torch.bool, device=self.device)
                if ids:
                    seen[:, torch.tensor(ids, device=self.device)] = True
            step = self._call_step(num_samples, state)  # the weights as they are now, for the whole sample
            if plan.lean:
                ids_buffer = np.zeros(1, np.int64)  # the step reads the id written here
                onnx = self.engine_used == "onnxruntime"  # its steps take and give numpy arrays
                next_ids = ids_buffer if onnx else torch.from_numpy(ids_buffer)
                logits_tensor, row = None, None
        for position in range(length):
            column = position % plan.block
            # torch ops run in inference mode, entered per token and never held across a yield:
            # the caller's own code between pieces must run in its own autograd mode
            with contextlib.nullcontext() if plan.lean and onnx and column else torch.inference_mode():
                if not plan.greedy and column == 0:
                    noise, draws = _draw_block(plan.gumbel, plan.lean, (plan.block, num_samples, plan.allowed),
                                               temperature, plan.generator)
                if plan.lean:
                    if logits is not logits_tensor:  # onnxruntime's logits are one buffer, rewritten each step
                        logits_tensor, row = logits, logits.numpy()[0, :plan.allowed]
                    # argmax(logits / T + Gumbel) is a draw from softmax(logits / T); the same pick as _sample's
                    ids_buffer[0] = token = int(row.argmax() if plan.greedy else (row + noise[column]).argmax())
                    tokens = (token,)
                else:
                    raw = logits
                    logits = logits[:, :plan.allowed]
                    if seen is not None:
                        logits = _penalize(logits, seen[:, :plan.allowed], repetition_penalty)
                    next_ids = _sample(logits, temperature, top_k, top_p, plan.generator,
                                       None if draws is None else draws[:, column:column + 1],
                                       None if noise is None else noise[column])  # (B,)
                    if seen is not None:
                        seen.scatter_(1, next_ids[:, None], True)
                    tokens = next_ids.tolist()
                    if logprobs is not None:
                        held.append(_logprob(self.tokenizer, raw[0], tokens[0], logprobs))
                pieces = outputs.push(tokens)
                # the next token's logits, before this one's text is handed out (one inference-mode entry per token)
                if position + 1 < length and not outputs.finished():
                    logits, state = step(next_ids, state)
            for index, piece in pieces:
                yield index, piece, held
                held = []
            if outputs.finished():
                return
        for index, piece in outputs.flush():
            yield index, piece, held

    def _plan(self, temperature, top_k, top_p, seed, num_samples, repetition_penalty, logprobs) -> "_Plan":
        """How one call draws: its generator, the ids it may pick, its blocks of random numbers, its path."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        vocab = self.tokenizer.vocab_size
        # never generate a char model's unknown id: it is the last one, so sample over the others
        unk = getattr(self.tokenizer, "unk_id", None)
        allowed = vocab - 1 if unk == vocab - 1 else vocab
        greedy = temperature < _GREEDY_BELOW
        # Random numbers for a block of tokens come from one call: per token, a call costs more
        # than the draw. Unfiltered sampling takes Gumbel noise (two ops per token); top-k and
        # top-p take one uniform number per sample for the inverse CDF.
        gumbel = (top_k == 0 or top_k >= allowed) and top_p >= 1.0
        block = max(1, min(_DRAW_BLOCK, (1 << 20) // (num_samples * allowed))) if gumbel else _DRAW_BLOCK
        # One CPU stream, unfiltered or greedy, without a penalty or log-probabilities (what
        # `generate` does by default): the pick is two numpy calls on views of the logits and the
        # noise, and the id goes to the step through a buffer, so a token costs little beyond its step.
        lean = (self.device.type == "cpu" and num_samples == 1 and (gumbel or greedy) and repetition_penalty == 1.0
                and logprobs is None)
        return _Plan(generator, allowed, greedy, gumbel, block, lean)

    def _call_step(self, num_samples: int, state: tuple):
        """The engine's step for this call. One torch stream on a CPU steps on one thread: a
        matrix-vector product gains little from a second one, and stalls on it for a long time
        when another process keeps that core busy (set only around the step: the caller's code
        keeps its threads)."""
        step = self._step_function(num_samples, state)
        threads = torch.get_num_threads()
        if not (self.device.type == "cpu" and num_samples == 1 and threads > 1 and self.engine_used == "torch"):
            return step

        def one_thread_step(ids, state):
            torch.set_num_threads(1)
            try:
                return step(ids, state)
            finally:
                torch.set_num_threads(threads)
        return one_thread_step

    def _torch_step(self):
        stepper = getattr(self.model, "stepper", None)
        return stepper(self.precision) if stepper else functools.partial(self.model.step, precision=self.precision)

    def _onnx_step(self):
        """The onnxruntime step for the weights as they are now (re-exported when they change)."""
        from .export import OnnxStepper, _checked_graph, cached_step_graph, quantized_graph

        key = self.model.weights_key()
        if self._onnx is None or self._onnx[0] != key:
            if self.run_dir is not None and key == self._run_weights_key:  # still the run's saved weights
                graph = cached_step_graph(self.run_dir, self.model, self.tokenizer)
            else:
                graph = _checked_graph(self.model)
            if self.precision == "int8":
                graph = quantized_graph(graph)
            self._onnx = (key, OnnxStepper(graph, self.model.config.cell == "lstm"))
        return self._onnx[1]

    def _step_function(self, num_samples: int, state: tuple):
        """The step of the engine for this call; ``auto`` times both once per batch size and weights."""
        engine = "onnxruntime" if self.precision == "int8" else self.engine
        if engine == "auto":
            engine = "torch"
            if self.device.type == "cpu" and hasattr(self.model, "weights_key"):
                from .export import onnx_available

                if onnx_available():
                    engine = self._auto_engine(num_samples, state)
        self.engine_used = engine
        return self._onnx_step().loop() if engine == "onnxruntime" else self._torch_step()

    def _auto_engine(self, num_samples: int, state: tuple) -> str:
        from .export import time_steps

        key = (num_samples, self.precision) + self.model.weights_key()
        if key not in self._auto_choice:
            threads = torch.get_num_threads()
            if num_samples == 1:  # as sampling runs them
                torch.set_num_threads(1)
            try:
                seconds = {"torch": time_steps(self._torch_step(), state, num_samples),
                           "onnxruntime": time_steps(self._onnx_step(), state, num_samples)}
            finally:
                torch.set_num_threads(threads)
            self._auto_choice[key] = min(seconds, key=seconds.get)
        return self._auto_choice[key]


@dataclass
class _Plan:
    """How one call of ``Sampler._pieces`` draws its tokens (see ``Sampler._plan``)."""

    generator: torch.Generator
    allowed: int  # ids it may pick: all but a char model's unknown id
    greedy: bool
    gumbel: bool  # unfiltered: Gumbel noise, not inverse-CDF draws
    block: int  # tokens per block of random numbers
    lean: bool  # the numpy fast path of one CPU stream


@dataclass
class Logprob:
    """One sampled token: its text, its log-probability (nats) and the most likely tokens at its place."""

    token: str
    logprob: float
    top: dict[str, float]


def _logprob(tokenizer: Tokenizer, logits: torch.Tensor, token: int, count: int) -> Logprob:
    """The ``Logprob`` of ``token`` under the model's own distribution ``logits`` [V]."""
    log_probs = torch.log_softmax(logits.float(), -1)
    top = top_tokens(tokenizer, log_probs[None], count)[0] if count else {}
    return Logprob(token_texts(tokenizer, [token])[0], float(log_probs[token]), top)


@dataclass
class Scores:
    """Per-token log-probabilities of a text (``Sampler.score``): parallel lists, one entry per token.

    ``text_offset[i]`` is where token ``i``'s text starts in ``"".join(tokens)``; ``top`` holds
    the most likely tokens and their log-probabilities at each position (None for the first).
    """

    ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None] | None = None

    @property
    def text_offset(self) -> list[int]:
        return list(itertools.accumulate((len(t) for t in self.tokens[:-1]), initial=0)) if self.tokens else []

    @property
    def total(self) -> float:
        """The summed log-probability of every scored token (all but the first)."""
        return math.fsum(x for x in self.logprobs if x is not None)


def forward_log_probs(model: torch.nn.Module, ids: Sequence[int], device: torch.device,
                      chunk: int = SCORE_CHUNK) -> Iterator[torch.Tensor]:
    """Log-softmax [T, V] (float32) of the next token after each of ``ids[:-1]``, ``chunk`` tokens at a
    time, the state carried from chunk to chunk (a fresh zero state at the start)."""
    state = None
    for start in range(0, max(len(ids) - 1, 0), chunk):
        x = torch.tensor([ids[start:start + chunk]], device=device)
        logits, state = model(x, state)
        yield torch.log_softmax(logits[0].float(), -1)


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each id's own text; a byte that is not a whole character is ``bytes:\\xNN``, as OpenAI writes it."""
    if tokenizer.kind == "byte":
        return [chr(i) if i < 128 else f"bytes:\\x{i:02x}" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def top_tokens(tokenizer: Tokenizer, log_probs: torch.Tensor, count: int) -> list[dict[str, float]]:
    """The ``count`` most likely tokens of each row of ``log_probs`` [T, V], as {token text: logprob}."""
    values, order = torch.topk(log_probs, min(count, log_probs.shape[-1]), dim=-1)
    names = {}
    rows = []
    for vals, ids in zip(values.tolist(), order.tolist()):
        for i in ids:
            if i not in names:
                names[i] = token_texts(tokenizer, [i])[0]
        rows.append({names[i]: v for i, v in zip(ids, vals)})
    return rows


@functools.lru_cache(maxsize=None)
def fp16_weights_supported() -> bool:
    """Whether this PyTorch build can run fp16-weight linear layers on the CPU (fbgemm, x86)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 2), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 2), packed)
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _count(name: str, value, least: int) -> int:
    """``value`` as an int >= ``least``, or a ConfigError naming it."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < least:
        raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    return number


def _draw_block(gumbel: bool, lean: bool, shape: tuple[int, int, int], temperature: float,
                generator: torch.Generator) -> tuple:
    """Random numbers for the next ``block`` tokens of ``samples`` over ``allowed`` ids: Gumbel noise
    (block, samples, allowed), as numpy (block, allowed) for the lean path; or uniform draws in
    (0, 1] (samples, block) for top-k and top-p. Returns (noise, draws), one of them None."""
    block, samples, allowed = shape
    if not gumbel:
        return None, 1.0 - torch.rand(samples, block, generator=generator, device=generator.device)
    noise = _gumbel_noise(shape, temperature, generator, generator.device)
    return (noise.numpy()[:, 0] if lean else noise), None


class _Outputs:
    """Each sample's text as its tokens come: decoded into whole characters, cut at a stop string
    (which may span pieces: the last few characters are kept to spot it), then done."""

    def __init__(self, tokenizer: Tokenizer, num_samples: int, stops: list[str]) -> None:
        self.decoders = [_TextDecoder(tokenizer) for _ in range(num_samples)]
        self.stops, self.keep = stops, max((len(s) for s in stops), default=0)
        self.tails = [""] * num_samples
        self.done = [False] * num_samples

    def push(self, tokens) -> list[tuple[int, str]]:
        """(sample index, text) for one new token of every sample."""
        pieces = []
        for index, token in enumerate(tokens):
            if self.done[index]:
                continue
            piece = self.decoders[index].push(token)
            if self.stops and piece:
                piece, self.done[index] = _cut_at_stop(self.tails[index], piece, self.stops)
                self.tails[index] = (self.tails[index] + piece)[-self.keep:]
            if piece:
                pieces.append((index, piece))
        return pieces

    def finished(self) -> bool:
        return all(self.done)

    def flush(self) -> Iterator[tuple[int, str]]:
        """What the decoders still hold at the end (an incomplete character)."""
        for index, decoder in enumerate(self.decoders):
            if not self.done[index]:
                piece = decoder.flush()
                if piece and self.stops:
                    piece, self.done[index] = _cut_at_stop(self.tails[index], piece, self.stops)
                if piece:
                    yield index, piece


def _cut_at_stop(tail: str, piece: str, stops: list[str]) -> tuple[str, bool]:
    """``piece`` cut just after the earliest stop string that ends inside it, and whether one did.

    ``tail`` is the text already emitted (at least the longest stop string's length of it), so a
    stop string that began in an earlier piece is found too; one wholly inside ``tail`` was
    found before and is not looked for again.
    """
    text = tail + piece
    best = None
    for s in stops:
        at = text.find(s, max(0, len(tail) - len(s) + 1))
        if at >= 0 and (best is None or at + len(s) < best):
            best = at + len(s)
    if best is None:
        return piece, False
    return text[len(tail):best], True
