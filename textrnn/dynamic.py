"""Dynamic evaluation (Krause et al. 2018): a copy of a run's weights that learns from a text as it reads it.

Each segment is scored first, then one gradient step is taken on it, scaled per weight by its RMS
gradient on the run's training split and pulled back toward the trained weights ("RMS with a
global decay prior"). Static scoring is ``evaluation.py``'s; nothing here writes to the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, TextRNNError
from .evaluation import EvalResult, masked_windows, scored_text, summarize

# Chosen on the training split of the two benchmark runs (BENCHMARKS.md, "Dynamic evaluation"),
# never on the text scored: bench/dynamic_eval.py --tune.
DEFAULT_LR = 3e-4
DEFAULT_DECAY = 5e-4
DEFAULT_SEQ_LEN = 20
STATISTICS_CHUNKS = 8  # the statistics' tokens come from this many places spread over the split
EPSILON = 0.1  # of the mean RMS gradient: bounds the step of weights that training text hardly moves


@dataclass(frozen=True)
class DynamicConfig:
    lr: float = DEFAULT_LR  # eta: a step moves each weight by lr x its gradient / its RMS gradient in training
    decay: float = DEFAULT_DECAY  # lambda: the share of the way back to the trained weights after each
    # segment, for a weight of average RMS gradient (scaled by its own, at most all the way)
    seq_len: int = DEFAULT_SEQ_LEN  # tokens per segment: one step after each
    statistics_tokens: int = 10_000  # training tokens the RMS gradients are measured on (5,000 to 200,000
    # changed the adapted loss on training text by at most 0.0015 nats: BENCHMARKS.md)

    def __post_init__(self) -> None:
        for name in ("lr", "decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"dynamic {name} must be a number >= 0, got {value!r}")
        if self.decay > 1:
            raise ConfigError(f"dynamic decay must be at most 1 (all the way back each segment), got {self.decay}")
        for name in ("seq_len", "statistics_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dynamic {name} must be a positive integer, got {value!r}")


@dataclass
class Statistics:
    rms: list[torch.Tensor]  # per parameter (in ``model.parameters()`` order): RMS of a segment's gradient
    source: str  # what they were measured on, for the report
    seconds: float


@dataclass
class DynamicResult:
    static: EvalResult  # as ``textrnn evaluate`` scores the file
    dynamic: EvalResult  # adapted as it is read
    config: DynamicConfig
    statistics: str  # where the RMS gradients came from
    seconds: dict[str, float]  # "static", "statistics", "dynamic"


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` without dropout, in training mode (so that cuDNN takes gradients); the original is untouched."""
    from .model import RNNLanguageModel

    config = dataclasses.replace(model.config, dropout=0.0, weight_drop=0.0)
    device = next(model.parameters()).device
    copy = RNNLanguageModel(config).to(device)
    copy.load_state_dict(model.state_dict())
    return copy.train()


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """One CPU thread for batch-1 passes, as sampling runs: a second gains little on such small
    matrix products and stalls them when another process keeps that core busy (BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _segments(model: torch.nn.Module, windows, device: torch.device):
    """For each (x, y) window in turn: its summed loss, its scored targets, and the gradient of its mean loss.

    The state carries over from window to window, detached. A consumer may change the weights
    in place between windows: the next one is read with the new weights.
    """
    from .model import detach_state

    params = list(model.parameters())
    state = None
    with torch.enable_grad():
        for x, y in windows:
            x_t, y_t = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)  # (1, T)
            logits, state = model(x_t, state)  # (1, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_t.reshape(-1), ignore_index=-100,
                                   reduction="sum")
            count = int((y_t != -100).sum())
            grads = torch.autograd.grad(loss / count, params) if count else None
            state = detach_state(state)
            yield float(loss.detach()), count, grads


def gradient_statistics(run, config: DynamicConfig) -> Statistics:
    """RMS gradient of each weight over ``config.seq_len``-token segments of the run's training split.

    The split is found where config.json says (``data/`` for a run trained from raw text, or the
    preprocess directory it named) and checked against its fingerprint. Without it (a run dir
    copied alone, the data moved or changed), the model's own samples stand in, with a warning:
    mean squared gradients on a model's own samples are the diagonal of its Fisher information,
    which those on its training split approximate.
    """
    started = time.perf_counter()
    chunks, source = _training_chunks(run, config.statistics_tokens)
    if chunks is None:
        warnings.warn(f"{source}; dynamic evaluation takes its gradient statistics from "
                      f"{config.statistics_tokens:,} tokens sampled from the model instead", stacklevel=2)
        chunks = _sampled_chunks(run, config.statistics_tokens)
        source = f"{sum(map(len, chunks)):,} tokens sampled from the model (no training split: {source})"
    model = trainable_copy(run.model)
    sums = [torch.zeros_like(p) for p in model.parameters()]
    segments = 0
    with _one_thread(run.device):
        for chunk in chunks:
            windows = masked_windows(np.asarray(chunk, dtype=np.int64), None, config.seq_len, 1)
            for _, _, grads in _segments(model, windows, run.device):
                if grads is not None:
                    torch._foreach_addcmul_(sums, grads, grads)
                    segments += 1
    rms = [(s / max(segments, 1)).sqrt_() for s in sums]
    return Statistics(rms, source, time.perf_counter() - started)


def _training_chunks(run, tokens: int) -> tuple[list[np.ndarray] | None, str]:
    """Up to ``tokens`` ids of the training split in ``STATISTICS_CHUNKS`` evenly spread pieces, and
    their description; or None and why there are none."""
    from .data import load_dataset
    from .runstate import data_fingerprint

    data = run.config.get("data") or {}
    if run.path is None or not isinstance(data.get("path"), str):
        return None, "no training data recorded for this model"
    path = Path(run.path) / data["path"]  # relative to the run, or absolute
    shown = data["path"] if not Path(data["path"]).is_absolute() else str(path)
    try:
        train = load_dataset(path).split("train")
        saved = (data.get("fingerprint") or {}).get("train")
        if saved is not None and data_fingerprint(path / "train.bin") != saved:
            return None, f"{shown}/train.bin: changed since training"
    except TextRNNError:
        return None, f"{shown}/train.bin: missing"
    if len(train) < 2:
        return None, f"{shown}/train.bin: too short"
    if len(train) <= tokens:
        return [train], f"all {len(train):,} tokens of {shown}/train.bin"
    size = max(2, tokens // STATISTICS_CHUNKS)
    starts = np.linspace(0, len(train) - size, STATISTICS_CHUNKS).astype(np.int64)
    return [train[s: s + size] for s in starts], f"{size * len(starts):,} tokens of {shown}/train.bin"


def _sampled_chunks(run, tokens: int) -> list[np.ndarray]:
    """``tokens`` ids the model samples itself (temperature 1, seed 0), as ``STATISTICS_CHUNKS`` streams."""
    from .sampling import Sampler

    sampler = Sampler(run.model, run.tokenizer, run.device, precision="fp32", engine="torch")
    texts = sampler.generate("", length=max(2, tokens // STATISTICS_CHUNKS), temperature=1.0,
                             num_samples=STATISTICS_CHUNKS, seed=0)
    return [ids for ids in map(run.tokenizer.encode_array, texts) if len(ids) >= 2]


class Adapter:
    """A copy of a model that takes one step on each segment right after scoring it.

    The step (Krause et al. 2018, "RMS with a global decay prior"), for each weight w with RMS
    gradient r on the training split, trained value w0 and gradient g on the segment just scored::

        w <- w - lr * g / (r + eps)  +  min(1, decay * r / mean(r)) * (w0 - w)

    ``eps`` is ``EPSILON`` x mean(r), the mean over all weights.
    """

    def __init__(self, model: torch.nn.Module, statistics: Statistics, config: DynamicConfig):
        self.model = trainable_copy(model)
        self.config = config
        self.params = list(self.model.parameters())
        self.trained = [p.detach().clone() for p in self.params]
        mean = torch.cat([r.flatten() for r in statistics.rms]).mean().clamp_min(1e-12)
        self.inverse = [1 / (r + EPSILON * mean) for r in statistics.rms]
        self.pull = [(config.decay * r / mean).clamp_(max=1.0) for r in statistics.rms]

    def read(self, ids: np.ndarray, mask: np.ndarray | None = None, progress: bool = False) -> tuple[float, int]:
        """Score ``ids`` segment by segment, adapting after each: the summed loss and the targets scored."""
        device = self.trained[0].device
        windows = masked_windows(np.asarray(ids), mask, self.config.seq_len, 1)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=math.ceil((len(ids) - 1) / self.config.seq_len), desc="dynamic evaluation",
                       unit="segment", leave=False, dynamic_ncols=True)
        total, scored = 0.0, 0
        with _one_thread(device):
            for loss, count, grads in _segments(self.model, windows, device):
                total += loss
                scored += count
                if grads is not None:
                    self._step(grads)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return total, scored

    @torch.no_grad()
    def _step(self, grads: tuple[torch.Tensor, ...]) -> None:
        torch._foreach_addcmul_(self.params, grads, self.inverse, value=-self.config.lr)
        torch._foreach_lerp_(self.params, self.trained, self.pull)  # w += pull * (w0 - w)


def evaluate_dynamic(run_dir: str | os.PathLike, file: str | os.PathLike, config: DynamicConfig | None = None, *,
                     device: str = "auto", errors: str = "strict", progress: bool = False) -> DynamicResult:
    """Score ``file`` under a run's best weights twice: as ``textrnn evaluate`` does, and dynamically.

    The dynamic pass reads the text as one stream (batch 1, as the paper), ``config.seq_len``
    tokens at a time, each segment scored before the step on it.
    """
    from .checkpoint import load_run
    from .evaluation import evaluate_text, read_scored_text
    from .runtime import resolve_device

    config = config or DynamicConfig()
    run = load_run(run_dir, resolve_device(device))
    text = read_scored_text(run, file, errors)
    started = time.perf_counter()
    static = evaluate_text(run, text, progress)
    static_seconds = time.perf_counter() - started
    statistics = gradient_statistics(run, config)
    started = time.perf_counter()
    loss_sum, scored = Adapter(run.model, statistics, config).read(text.ids, text.mask, progress)
    dynamic = summarize(loss_sum, scored, text.chars_per_token, text.unknown)
    seconds = {"static": static_seconds, "statistics": statistics.seconds, "dynamic": time.perf_counter() - started}
    return DynamicResult(static, dynamic, config, statistics.source, seconds)


def adapt(sampler, text: str, run_dir: str | os.PathLike | None = None, config: DynamicConfig | None = None,
          name: str = "text"):
    """A new Sampler whose weights are a copy of ``sampler``'s, adapted to ``text`` as ``evaluate_dynamic`` reads it.

    Sample from it with a prompt in the text's style: the weights follow the text, not only the
    state. ``sampler`` and the run's files are unchanged. The gradient statistics come from the
    training split of ``run_dir`` (default: the run the sampler was loaded from).
    """
    from .checkpoint import Run
    from .sampling import Sampler

    config = config or DynamicConfig()
    run_dir = run_dir if run_dir is not None else sampler.run_dir
    run = Run(Path(run_dir) if run_dir is not None else None, sampler.config, sampler.model, sampler.tokenizer,
              sampler.device)
    document = scored_text(sampler.tokenizer, text, name, "adapt to")
    adapter = Adapter(sampler.model, gradient_statistics(run, config), config)
    adapter.read(document.ids, document.mask)
    return Sampler(adapter.model.eval(), sampler.tokenizer, sampler.device, sampler.config, sampler.precision,
                   sampler.engine)


def adapt_to_file(sampler, file: str | os.PathLike, run_dir: str | os.PathLike | None = None,
                  config: DynamicConfig | None = None):
    """``adapt`` to the text of a UTF-8 file (InputError naming it if it cannot be read or is empty)."""
    from .data import read_chunks

    return adapt(sampler, "".join(read_chunks(Path(file))), run_dir, config, name=str(file))
