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
DECAYS = ("cosine", "linear")


def _field(default: Any, help: str) -> Any:
    """A dataclass field whose ``help`` is the one description of a setting: the CLI and docs show it."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = _field(0, "Vocabulary size; set from the tokenizer when the model is built.")
    cell: str = _field("lstm", "Recurrent cell: lstm, gru or rnn (tanh).")
    num_layers: int = _field(2, "Stacked recurrent layers.")
    hidden_size: int = _field(512, "Units per recurrent layer.")
    embedding_dim: int = _field(128, "Size of the token embedding.")
    dropout: float = _field(0.2, "Dropout between recurrent layers, on the embedding and on the output.")
    tie_weights: bool = _field(False, "Share embedding and output weights (a projection bridges sizes).")
    weight_drop: float = _field(0.0, "DropConnect on the recurrent hidden-to-hidden weights in training: one "
                                     "mask per window (AWD-LSTM).")

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        _check_positive("num_layers", self.num_layers)
        _check_positive("hidden_size", self.hidden_size)
        _check_positive("embedding_dim", self.embedding_dim)
        if self.vocab_size < 0:
            raise ConfigError(f"vocab_size must be >= 0, got {self.vocab_size}")
        for name in ("dropout", "weight_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")

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
# "auto", the default, sizes the model for the time budget (BENCHMARKS.md §0, tiny Shakespeare):
# "small" has the lowest val loss at 2 and 10 CPU minutes, and stops improving by 30 (1.4071 at
# 30 against 1.4069 at 10); from AUTO_WIDE_FROM seconds on, a wider model with more dropout has
# the steps it needs (30 minutes: 1.3817 on one core, 1.3900 for "medium"). Without a time
# budget (--max-steps, --epochs) it is "small".
AUTO_WIDE_FROM = 20 * 60.0
AUTO_WIDE = dict(num_layers=2, hidden_size=384, embedding_dim=128, dropout=0.15)
# ... and for the text (BENCHMARKS.md, "The default fitted to the corpus"): from AUTO_WIDE_TEXT's
# budget on (the trainer's 10-minute default included), a corpus of at least its training tokens gets
# the wider model too. At 10 minutes on 4 million tokens, which the 2x256 reads only 4 times, the 2x384
# is ahead or level (Python 1.1988 against 1.2201, the GNU manuals 1.1278 against 1.1238); on a million
# it is level (-0.011 to +0.008), and at 2 minutes behind on both (too few steps).
AUTO_WIDE_TEXT = (10 * 60.0, 2_000_000)
DEFAULT_PRESET = "auto"
PRESET_CHOICES = ("auto", *PRESETS)
# ... and once the data and the plan are known, fits the width and the regularisation to the corpus
# (auto_shape, auto_regularisation); a setting given on the command line or in a file is kept, and a
# shape given (--layers, --hidden, ...) keeps the width.
AUTO_FITTED = ("dropout", "weight_drop", "hidden_size")
# Measured with the 2x256 default (BENCHMARKS.md, "The default fitted to the corpus"): the dropout
# that the grid's best settings had, by how often the plan reads the corpus (planned epochs) and
# by how much text there is (training tokens). Between two rows the dropout follows the logarithm;
# outside them, the end rows. The text is counted in tokens, not tokens per weight: the 2x384 that
# auto trains from 20 minutes on, on tiny Shakespeare at 30 minutes, has half the text per weight of
# the 2x256 at 10 and was best with the same dropout (0.15: 1.3817 and 1.3797, 0.23: 1.3910).
AUTO_DROPOUT_BY_EPOCHS = ((4.0, 0.05), (13.0, 0.15), (39.0, 0.35))
AUTO_DROPOUT_BY_DATA = ((265_000, 0.35), (950_000, 0.15), (3_800_000, 0.05))
AUTO_WEIGHT_DROP = (30.0, 100_000, 0.2)  # from this many epochs, at most this many tokens: DropConnect 0.2


def auto_shape(max_time: float | None, train_tokens: int | None = None) -> dict[str, Any]:
    """The shape (and its least dropout) that ``auto`` trains for a time budget of ``max_time``
    seconds (None: a step budget) on ``train_tokens`` training tokens (None: not known yet)."""
    least_time, least_tokens = AUTO_WIDE_TEXT
    if max_time is not None and (max_time >= AUTO_WIDE_FROM or (
            max_time >= least_time and train_tokens is not None and train_tokens >= least_tokens)):
        return AUTO_WIDE
    return PRESETS["small"]


def preset(name: str, max_time: float | None = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with any fields overridden; ``auto`` follows ``max_time`` (seconds)
    until the corpus is known (``auto_shape``)."""
    if name == "auto":
        shape = auto_shape(max_time)
    elif name in PRESETS:
        shape = PRESETS[name]
    else:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_CHOICES)}")
    return ModelConfig(**{**shape, **overrides})


def auto_regularisation(planned_epochs: float, train_tokens: float, floor: float = 0.0) -> dict[str, float]:
    """Dropout and weight drop for a plan that reads its ``train_tokens`` training tokens
    ``planned_epochs`` times.

    Both must be large to overfit: a corpus read a few times is not memorised, however small, and
    the more text there is, the less dropout pays (at a million tokens and 17 epochs, 0.15 is level
    with 0.25 on Python and with 0.05 on tiny Shakespeare). So the dropout is the smaller of what
    each calls for, and never below ``floor`` (the preset's).
    """
    by_epochs = _log_interpolate(AUTO_DROPOUT_BY_EPOCHS, planned_epochs)
    by_data = _log_interpolate(AUTO_DROPOUT_BY_DATA, train_tokens)
    epochs, most_tokens, weight_drop = AUTO_WEIGHT_DROP
    return {"dropout": round(max(floor, min(by_epochs, by_data)), 2),
            "weight_drop": weight_drop if planned_epochs >= epochs and train_tokens <= most_tokens else 0.0}


def _log_interpolate(rows: tuple[tuple[float, float], ...], x: float) -> float:
    """``y`` at ``x`` on the piecewise line through ``rows`` in log(x); the end values outside them."""
    if x <= rows[0][0]:
        return rows[0][1]
    for (x0, y0), (x1, y1) in zip(rows, rows[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * math.log(x / x0) / math.log(x1 / x0)
    return rows[-1][1]


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
    seq_len: int = _field(64, "BPTT window: tokens per stream per step.")
    batch_size: int = _field(32, "Parallel contiguous streams per step (per process).")
    lr: float = _field(5e-3, "Peak learning rate (AdamW).")
    decay: str = _field("cosine", "Learning-rate decay after warmup, over the planned steps: cosine or linear.")
    min_lr_ratio: float = _field(0.0, "The decay ends at lr x this.")
    warmup_steps: int = _field(100, "Linear warmup steps (at most 5% of the planned steps).")
    weight_decay: float = _field(0.1, "AdamW decoupled weight decay on matrices.")
    grad_clip: float = _field(1.0, "Global-norm gradient clip (0 = off).")
    ema: float = _field(0.0, "Evaluate, keep and sample from an exponential moving average of the weights "
                             "with this decay, e.g. 0.999 (0 = off).")
    max_steps: int | None = _field(None, "Stop after N optimizer steps, counted from the run's start.")
    max_time: float | None = _field(None, "Wall-clock budget for the whole run: 90s, 10m, 1h30m "
                                          "(10m when no stopping rule is given).")
    epochs: float | None = _field(None, "Stop after N passes over the training split.")
    eval_every: int | None = _field(None, "Steps between evaluations (default: 10 evaluations over the run).")
    eval_tokens: int | None = _field(None, "Validation tokens per periodic evaluation (default: all, unless "
                                           "that takes over 10% of a time budget); the last one is complete.")
    sample_length: int = _field(200, "Tokens sampled at every evaluation into samples.jsonl (0 = off).")
    sample_prompt: str | None = _field(None, "Prompt of those samples (default: the first line of the "
                                             "validation text).")
    log_every: int = _field(10, "Steps between metrics.jsonl train rows.")
    checkpoint_every: int = _field(0, "Steps between last/ checkpoints besides evaluations (0 = at evaluations).")
    seed: int = _field(1337, "Seeds Python, numpy and torch.")
    device: str = _field("auto", "auto, cpu, cuda or mps.")
    precision: str = _field("auto", "auto (bf16 where the hardware has it), fp32 or bf16.")
    threads: int | None = _field(None, "CPU threads (default: the cores that are idle at start; "
                                       "TEXTRNN_THREADS sets it too).")
    compile: bool = _field(False, "torch.compile the model.")
    max_bad_steps: int = _field(5, "Consecutive non-finite or diverged steps before training stops.")
    eval_batches: int | None = _field(None, "Evaluation streams (default: the training streams).")

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "log_every", "max_bad_steps"):
            _check_positive(name, getattr(self, name))
        for name in ("eval_every", "eval_tokens", "threads"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.decay not in DECAYS:
            raise ConfigError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if isinstance(self.sample_length, bool) or not isinstance(self.sample_length, int) or self.sample_length < 0:
            raise ConfigError(f"sample_length must be an integer >= 0 (0 = off), got {self.sample_length!r}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("warmup_steps and checkpoint_every must be >= 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1) (0 = off), got {self.ema}")
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


# ---------------------------------------------------------------- settings from a TOML file and flags

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
# the data stage's settings and the run to start from: not dataclass fields, so checked here
DATA_TYPES: dict[str, Any] = {"tokenizer": str, "vocab_size": int, "val_fraction": (int, float), "errors": str,
                              "preset": str, "init_from": str}
DATA_DEFAULTS: dict[str, Any] = {"tokenizer": "char", "vocab_size": None, "val_fraction": 0.1, "errors": "strict",
                                 "init_from": None}
# what makes the weights of one model fit another: a fine-tuned model keeps its base's
SHAPE_KEYS = ("cell", "num_layers", "hidden_size", "embedding_dim", "tie_weights")
REGULARISATION_KEYS = ("dropout", "weight_drop")  # what a fine-tuned run may change in its base's model


def help_text(config_class: type, name: str) -> str:
    """A setting's help with its default, for ``--help``: the dataclass field is the one source
    (a model size's default is the preset's)."""
    item = next(f for f in dataclasses.fields(config_class) if f.name == name)
    if config_class is ModelConfig and name in PRESETS["small"]:
        return item.metadata["help"] + " [default: the preset's]"
    default = item.default
    shown = "" if default is None else f" [default: {format_duration(default) if name == 'max_time' else default}]"
    return item.metadata["help"] + shown


def read_toml_settings(path: Any) -> dict[str, Any]:
    """The settings of a TOML file, flattened from its optional [model], [train] and [data] tables."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from .errors import InputError

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML ({exc})") from None
    except UnicodeDecodeError as exc:  # tomllib reads UTF-8 only
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train", "data") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - MODEL_KEYS - set(DATA_TYPES) - TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if "max_time" in flat:
        try:
            flat["max_time"] = parse_duration(flat["max_time"])
        except ConfigError as exc:
            raise ConfigError(f"{path}: max_time: {exc}") from None
    return flat


def build_configs(file_settings: dict[str, Any], flags: dict[str, Any], source: str
                  ) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """The preset, then the config file, then command-line flags (flags win; a None flag is unset).

    Returns the model and train configs and the data stage's settings (tokenizer, vocab_size,
    val_fraction, errors, init_from) with defaults filled in, and ``fit``: the settings that
    ``auto`` fits once the plan is known (``AUTO_FITTED`` less those given).
    """
    settings = {**file_settings, **{k: v for k, v in flags.items() if v is not None}}
    for key, kinds in DATA_TYPES.items():
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ConfigError(f"{source}: {key} has the wrong type ({type(value).__name__}: {value!r})")
    name = settings.pop("preset", DEFAULT_PRESET)
    base = preset(name, settings.get("max_time"))
    model = {**base.to_dict(), **{k: v for k, v in settings.items() if k in MODEL_KEYS}}
    data = {**DATA_DEFAULTS, **{k: settings[k] for k in DATA_DEFAULTS if k in settings}}
    shape_given = any(k in settings for k in SHAPE_KEYS)
    data["fit"] = [k for k in AUTO_FITTED if k not in settings and not (k in SHAPE_KEYS and shape_given)] \
        if name == "auto" else []
    train = {k: v for k, v in settings.items() if k in TRAIN_KEYS}
    return ModelConfig.from_dict(model, source), TrainConfig.from_dict(train, source), data

# what --resume may change: stopping rules, evaluation and where it runs; never the model or the data
RESUME_OVERRIDES = {"max_steps", "max_time", "epochs", "eval_every", "eval_tokens", "device", "threads"}


def finetune_model_config(base: ModelConfig, settings: dict[str, Any], source: str) -> ModelConfig:
    """The model of a run fine-tuned from a run whose model is ``base``: the base's, regularisation aside.

    ``settings`` are what the user gave (a None value is unset): a preset or a shape setting
    (``SHAPE_KEYS``) that contradicts the base is refused, since the base's weights would not fit;
    ``dropout`` and ``weight_drop`` may change. The vocabulary size is set later, from the tokenizer.
    """
    named = settings.get("preset") not in (None, "auto")  # auto means: whatever fits, so the base's model
    given = dict(preset(settings["preset"]).to_dict()) if named else {}
    given.update({k: v for k, v in settings.items() if k in MODEL_KEYS and v is not None})
    clashes = [f"{k} {given[k]!r} (the base has {getattr(base, k)!r})" for k in SHAPE_KEYS
               if k in given and given[k] != getattr(base, k)]
    if clashes:
        raise ConfigError(f"{source}: init_from keeps the base run's model, but got {', '.join(clashes)}; "
                          f"drop the model-shape settings (--preset, --cell, --layers, --hidden, --embed, --tie)")
    changed = {k: settings[k] for k in REGULARISATION_KEYS if settings.get(k) is not None}
    return ModelConfig.from_dict({**base.to_dict(), **changed}, source)
