"""Sampling: ``sample_logits`` (pure, tensors only) and ``Sampler`` (model + tokenizer + state).

A prompt is primed with one forward pass over all of it; then each new token costs one step of
the model's single-token path, under ``torch.inference_mode()``, with every sample of a call in
one batch. Streams yield only complete characters, so byte and SentencePiece models never emit
broken UTF-8. Loading a run lives in ``checkpoint.py``.
"""

from __future__ import annotations

import codecs
import math
import os
from collections.abc import Iterator, Sequence

import torch

from .checkpoint import load_run
from .errors import ConfigError, InputError, TextRNNError
from .runtime import resolve_device

MAX_LENGTH = 10_000_000  # tokens per call; far beyond any sensible sample, far below running out of memory


class SamplingError(TextRNNError, ValueError):
    """A sampling setting out of range (a ValueError too, for code that catches that)."""


def _check_sampling_args(temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0) -> None:
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise SamplingError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if math.isinf(temperature):
        raise SamplingError("temperature must be finite (0 = greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not isinstance(top_p, (int, float)) or math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if math.isnan(repetition_penalty) or repetition_penalty <= 0 or math.isinf(repetition_penalty):
        raise SamplingError(f"repetition_penalty must be a positive number (1 = off), got {repetition_penalty}")


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, repetition_penalty: float = 1.0,
                  previous: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one id per row of ``logits`` [B, V]; returns [B] int64.

    Temperature 0 is greedy (argmax). Top-k keeps the k largest logits (0, or k >= V, is off);
    top-p then keeps the smallest set of the remaining tokens whose probability reaches p (1 is
    off). ``repetition_penalty`` > 1 divides the positive logits (multiplies the negative ones)
    of the ids in ``previous`` [B, N], as in CTRL.
    """
    _check_sampling_args(temperature, top_k, top_p, repetition_penalty)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    logits = logits.float()
    if repetition_penalty != 1.0 and previous is not None and previous.numel():
        seen = torch.gather(logits, 1, previous)
        logits = logits.scatter(1, previous, torch.where(seen > 0, seen / repetition_penalty,
                                                         seen * repetition_penalty))
    # NaN never wins; +inf wins outright (as the limit of a huge logit would)
    logits = torch.nan_to_num(logits, nan=-math.inf)
    if temperature == 0:
        return logits.argmax(dim=-1)
    pos_inf = logits == math.inf
    if pos_inf.any():
        logits = torch.where(pos_inf.any(-1, keepdim=True), torch.where(pos_inf, 0.0, -math.inf), logits)
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # keeps the minimal prefix reaching top_p (always the top token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    all_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits = torch.where(all_masked, torch.zeros_like(logits), logits)  # every logit -inf: uniform
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _TextDecoder:
    """Turns a growing list of ids into text pieces that hold only complete characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = tokenizer.kind
        if self.kind == "byte":
            self._bytes = codecs.getincrementaldecoder("utf-8")("replace")
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token: int) -> str:
        if self.kind == "char":
            return self.tokenizer.decode([token])
        if self.kind == "byte":
            return self._bytes.decode(bytes([token]))
        # SentencePiece: decode the pending ids; hold back a trailing partial character
        self._ids.append(token)
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        self._ids = []
        return text

    def flush(self) -> str:
        if self.kind == "byte":
            return self._bytes.decode(b"", final=True)
        if self.kind in ("bpe", "unigram") and self._ids:
            text, self._ids = self.tokenizer.decode(self._ids), []
            return text
        return ""


class Sampler:
    """Generate text from a trained run.

    >>> sampler = Sampler.from_checkpoint("runs/shakespeare")
    >>> sampler.generate("ROMEO:", length=200, temperature=0.8, seed=7)

    Stop strings end a sample and are kept at its end (the text up to and including the first
    stop string). ``length`` counts tokens (characters for a char model).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device | None = None,
                 config: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.config = config or {}

    @classmethod
    def from_checkpoint(cls, run_dir: str | os.PathLike, device: str = "auto") -> "Sampler":
        run = load_run(run_dir, resolve_device(device))
        return cls(run.model, run.tokenizer, run.device, run.config)

    @property
    def seq_len(self) -> int | None:
        return self.config.get("train", {}).get("seq_len")

    def encode_prompt(self, prompt: str, unknown: str = "error") -> list[int]:
        """Prompt ids; characters outside a char vocabulary raise (``unknown="skip"`` drops them)."""
        try:
            return self.tokenizer.encode(prompt, unknown=unknown)
        except InputError as exc:
            raise InputError(f"prompt: {exc}") from None

    def _fresh_logits(self, num_samples: int, state) -> torch.Tensor:
        """First-token logits for an empty prompt, from a fresh state.

        The model has no start-of-text token, so it reads an implicit newline (not emitted) when
        the vocabulary has one: text after a line break is the most natural start. Without a
        newline the first token is uniform.
        """
        try:
            newline = self.tokenizer.encode("\n")
        except InputError:
            newline = []
        if len(newline) != 1:
            return torch.zeros(num_samples, self.tokenizer.vocab_size, device=self.device)
        ids = torch.tensor(newline, device=self.device).expand(num_samples, 1)
        logits, fresh = self.model(ids, state)
        for mine, new in zip(state, fresh):
            mine.copy_(new)
        return logits[:, -1]

    def generate(self, prompt: str = "", length: int = 500, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, num_samples: int = 1,
                 stop: str | Sequence[str] | None = None, repetition_penalty: float = 1.0,
                 unknown: str = "error") -> str | list[str]:
        """``num_samples`` continuations of ``prompt`` (a str, or a list when num_samples > 1)."""
        texts = [""] * num_samples
        for index, piece in self._pieces(prompt, length, temperature, top_k, top_p, seed, num_samples, stop,
                                         repetition_penalty, unknown):
            texts[index] += piece
        return texts[0] if num_samples == 1 else texts

    def stream(self, prompt: str = "", length: int = 500, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
               repetition_penalty: float = 1.0, unknown: str = "error") -> Iterator[str]:
        """Yield the text of one sample piece by piece as it is made."""
        for _, piece in self._pieces(prompt, length, temperature, top_k, top_p, seed, 1, stop,
                                     repetition_penalty, unknown):
            yield piece

    def _pieces(self, prompt, length, temperature, top_k, top_p, seed, num_samples, stop, repetition_penalty,
                unknown) -> Iterator[tuple[int, str]]:
        _check_sampling_args(temperature, top_k, top_p, repetition_penalty)
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ConfigError(f"length must be an integer >= 0, got {length!r}")
        if length > MAX_LENGTH:
            raise ConfigError(f"length {length} is more than the limit of {MAX_LENGTH:,} tokens per call")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ConfigError("stop strings must not be empty")
        ids = self.encode_prompt(prompt, unknown)
        if length == 0:
            return
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed() % (2**63))
        model, device = self.model, self.device
        unk = getattr(self.tokenizer, "unk_id", None)
        history = None
        with torch.inference_mode():
            state = model.init_state(num_samples, device)
            if ids:
                prompt_ids = torch.tensor(ids, device=device).unsqueeze(0).expand(num_samples, -1)
                logits, state = model(prompt_ids, state)  # one pass over the whole prompt
                logits = logits[:, -1]
                if repetition_penalty != 1.0:
                    history = prompt_ids
            else:
                logits = self._fresh_logits(num_samples, state)
            decoders = [_TextDecoder(self.tokenizer) for _ in range(num_samples)]
            tails = [""] * num_samples  # recent text, to spot stop strings across pieces
            done = [False] * num_samples
            keep = max((len(s) for s in stops), default=0)
            for _ in range(length):
                if unk is not None:
                    logits[:, unk] = -math.inf  # never generate the unknown-character id
                next_ids = sample_logits(logits, temperature, top_k, top_p, generator, repetition_penalty,
                                         history)
                if repetition_penalty != 1.0:
                    history = next_ids[:, None] if history is None else torch.cat([history, next_ids[:, None]], 1)
                for index, token in enumerate(next_ids.tolist()):
                    if done[index]:
                        continue
                    piece = decoders[index].push(token)
                    if stops and piece:
                        piece, done[index] = _cut_at_stop(tails[index], piece, stops)
                        tails[index] = (tails[index] + piece)[-keep:]
                    if piece:
                        yield index, piece
                if all(done):
                    return
                logits, state = model.step(next_ids, state)
            for index, decoder in enumerate(decoders):
                if not done[index]:
                    piece = decoder.flush()
                    if piece:
                        yield index, piece


def _cut_at_stop(tail: str, piece: str, stops: list[str]) -> tuple[str, bool]:
    """``piece`` cut just after the first stop string that ends in it (searching tail + piece)."""
    text = tail + piece
    best = None
    for s in stops:
        at = text.find(s, max(0, len(tail) - len(s) + 1))
        if at >= 0 and (best is None or at + len(s) < best):
            best = at + len(s)
    if best is None:
        return piece, False
    return text[len(tail):best], True
