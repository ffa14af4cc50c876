"""Typed, validated configuration: ModelConfig, TrainConfig, the presets, and durations.

Everything here is plain Python (no torch import) so that configs load fast and can be
checked before any heavy work starts. Configs go to JSON beside the weights and come back
with ``from_dict``, which rejects unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

CELLS = ("lstm", "gru", "rnn")
TOKENIZERS = ("char", "byte", "bpe", "unigram")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # set from the tokenizer when the model is built
    cell: str = "gru"  # gru | lstm | rnn (tanh); gru learns fastest per CPU second (BENCHMARKS.md)
    num_layers: int = 2  # stacked recurrent layers
    hidden_size: int = 512  # units per recurrent layer
    embedding_dim: int = 128  # size of the token embedding
    dropout: float = 0.2  # between recurrent layers, and on the embedding and the output
    tie_weights: bool = False  # share embedding and head; a projection bridges hidden != embedding

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        _check_positive("num_layers", self.num_layers)
        _check_positive("hidden_size", self.hidden_size)
        _check_positive("embedding_dim", self.embedding_dim)
        if self.vocab_size < 0:
            raise ConfigError(f"vocab_size must be >= 0, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> "ModelConfig":
        return _from_dict(cls, data, source)


# Presets: (num_layers, hidden_size, embedding_dim, dropout). Parameter counts are printed by
# `textrnn train --help` and `textrnn info`, computed for a 65-symbol vocabulary.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=1, hidden_size=128, embedding_dim=64, dropout=0.0),
    "small": dict(num_layers=2, hidden_size=256, embedding_dim=128, dropout=0.05),
    "medium": dict(num_layers=2, hidden_size=512, embedding_dim=128, dropout=0.2),
    "large": dict(num_layers=3, hidden_size=1024, embedding_dim=256, dropout=0.3),
}
DEFAULT_PRESET = "small"  # the lowest val loss after 2, 5 and 10 CPU minutes (BENCHMARKS.md)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named preset, with any fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def count_parameters(config: ModelConfig, vocab_size: int | None = None) -> int:
    """Parameter count of the model a config describes, without building it."""
    vocab = vocab_size if vocab_size is not None else config.vocab_size
    h, e, n = config.hidden_size, config.embedding_dim, config.num_layers
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[config.cell]
    total = vocab * e  # embedding
    for layer in range(n):
        inp = e if layer == 0 else h
        total += gates * h * (inp + h) + 2 * gates * h
    if config.tie_weights:
        total += (h * e if h != e else 0) + vocab  # projection (no bias) and head bias
    else:
        total += vocab * h + vocab
    return total


@dataclass
class TrainConfig:
    seq_len: int = 64  # BPTT window: tokens per stream per step
    batch_size: int = 64  # parallel contiguous streams
    lr: float = 5e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0  # global-norm clip; 0 switches it off
    max_steps: int | None = None  # stop after this many optimizer steps (counted from run start)
    max_time: float | None = None  # stop after this many seconds of training (from run start)
    epochs: float | None = None  # stop after this many passes over the training split
    eval_every: int = 500  # steps between evaluations (and best-weight saves)
    log_every: int = 10  # steps between metrics.jsonl train rows
    checkpoint_every: int = 0  # steps between last/ checkpoints besides evaluations; 0 = at evals only
    seed: int = 1337  # seeds Python, numpy and torch
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 5  # consecutive non-finite or diverged steps before training stops
    eval_batches: int | None = None  # eval streams; defaults to batch_size

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "eval_every", "log_every", "max_bad_steps"):
            _check_positive(name, getattr(self, name))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("warmup_steps and checkpoint_every must be >= 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ConfigError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_time is not None and not (self.max_time > 0 and math.isfinite(self.max_time)):
            raise ConfigError(f"max_time must be a positive duration, got {self.max_time}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_batches is not None:
            _check_positive("eval_batches", self.eval_batches)

    @property
    def eval_streams(self) -> int:
        return self.eval_batches or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> "TrainConfig":
        return _from_dict(cls, data, source)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a JSON/TOML value fits a dataclass field annotation (int, float, str, bool, X | None)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"int": int, "float": float, "str": str, "bool": bool})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _from_dict(cls: type, data: dict[str, Any], source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    for key, value in data.items():
        if not _type_ok(value, fields[key].type):
            raise ConfigError(f"{source}: {key} has the wrong type ({type(value).__name__}: {value!r})")
    values = {k: (float(v) if fields[k].type in ("float", "float | None") and isinstance(v, int) else v)
              for k, v in data.items()}
    return cls(**values)


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str | float | int) -> float:
    """Seconds in '90s', '10m', '1h30m', '1.5h' or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        try:
            seconds = float(raw)
        except ValueError:
            match = _DURATION.match(raw)
            if not raw or not match or not any(match.groups()):
                raise ConfigError(f"cannot read duration {text!r}; use e.g. 90s, 10m, 1h30m or seconds") from None
            h, m, s = (float(g) if g else 0.0 for g in match.groups())
            seconds = h * 3600 + m * 60 + s
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"duration must be positive, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
