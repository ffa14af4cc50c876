"""Loss, bits per character and perplexity of token ids or a text file under a model.

Contiguous streams, the state carried from window to window, every token scored once (under DDP
each rank scores its share, the sums all-reduced). Training calls ``evaluate_ids``, ``textrnn
evaluate`` ``evaluate_file``; dynamic evaluation, which adapts the weights, is ``dynamic.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import eval_windows, read_chunks
from .errors import ConfigError, InputError
from .runtime import autocast, resolve_device, resolve_precision


@dataclass
class EvalResult:
    loss: float  # nats per scored token
    bpc: float  # bits per character
    perplexity: float  # per token
    tokens: int  # tokens scored
    chars: int  # characters those tokens cover
    unknown: int = 0  # characters outside the vocabulary (fed as the unknown id, not scored)


@torch.no_grad()
def evaluate_ids(model: torch.nn.Module, ids: np.ndarray, *, seq_len: int, streams: int,
                 device: torch.device, precision: str = "fp32", rank: int = 0, world_size: int = 1,
                 mask: np.ndarray | None = None, progress: bool = False) -> tuple[float, int]:
    """Summed cross-entropy (nats) and the number of scored targets over all of ``ids``.

    ``mask`` (same length as ids, True = score) leaves some targets out, e.g. unknown characters.
    """
    was_training = model.training
    model.eval()
    total_streams = max(1, min(streams, max(len(ids) - 1, 1)))
    owned = range(rank, total_streams, world_size)
    # the sums are float64, so no window's loss is rounded away; MPS has no float64: they stay on the CPU
    sums_device = torch.device("cpu") if device.type == "mps" else device
    total = torch.zeros(2, dtype=torch.float64, device=sums_device)
    state = None
    # windows are made as they are used, never all at once: a split may be larger than memory
    windows = masked_windows(ids, mask, seq_len, total_streams, owned) if len(owned) else iter(())
    bar = None
    if progress:
        from tqdm import tqdm

        count = math.ceil(math.ceil((len(ids) - 1) / total_streams) / seq_len) if len(owned) and len(ids) > 1 else 0
        bar = tqdm(total=count, desc="evaluating", unit="window", leave=False, dynamic_ncols=True)
    for x, y in windows:
        x_t = torch.from_numpy(x).to(device)
        y_t = torch.from_numpy(y).to(device)
        if state is None:
            state = _unwrap(model).init_state(x_t.shape[0], device)
        with autocast(device, precision):
            logits, state = model(x_t, state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y_t.reshape(-1),
                               ignore_index=-100, reduction="sum")
        total[0] += loss.detach().to(sums_device).double()
        total[1] += (y_t != -100).sum().to(sums_device)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0]), int(total[1])


def masked_windows(ids: np.ndarray, mask: np.ndarray | None, seq_len: int, streams: int,
                   owned: range | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``eval_windows`` whose targets are -100 (not scored) wherever ``mask`` is False."""
    windows = eval_windows(ids, seq_len, streams, owned)
    if mask is None:
        return windows
    scored = eval_windows(np.where(mask, ids, -100), seq_len, streams, owned)
    return ((x, np.where(ys >= 0, y, -100)) for (x, y), (_, ys) in zip(windows, scored))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(inner, "_orig_mod", inner)  # torch.compile


def summarize(loss_sum: float, tokens: int, chars_per_token: float, unknown: int = 0) -> EvalResult:
    """Per-token loss, and bits per character as ``loss / chars_per_token / ln 2``."""
    loss = loss_sum / max(tokens, 1)
    bpc = loss / chars_per_token / math.log(2)
    return EvalResult(loss=loss, bpc=bpc, perplexity=math.exp(min(loss, 700)), tokens=tokens,
                      chars=round(tokens * chars_per_token), unknown=unknown)


@dataclass
class ScoredText:
    """A text file as a run scores it: token ids, which targets count, and characters per token."""

    ids: np.ndarray
    mask: np.ndarray | None  # True = scored; None when every token is
    unknown: int  # characters outside a char vocabulary: fed as the unknown id, not scored
    chars_per_token: float


def read_scored_text(run, file: str | os.PathLike, errors: str = "strict") -> ScoredText:
    """Read and encode ``file`` for scoring under ``run`` (see ``scored_text``)."""
    path = Path(file)
    return scored_text(run.tokenizer, "".join(read_chunks(path, errors=errors)), str(path))


def scored_text(tok, text: str, name: str, purpose: str = "evaluate") -> ScoredText:
    """Encode ``text`` for scoring; InputError naming ``name`` (and ``purpose``) if it has under two tokens.

    Characters a ``char`` tokenizer has never seen are fed to the model as its unknown id, so
    the state runs on, but they are not scored: left out of the loss and of bits per character.
    """
    if not text:
        raise InputError(f"{name}: empty file, nothing to {purpose}")
    unknown = 0
    mask = None
    if tok.kind == "char":
        ids = tok.encode_array(text, unknown="unk")
        mask = ids != tok.unk_id
        unknown = int((~mask).sum())
    else:
        ids = tok.encode_array(text)
    if len(ids) < 2:
        raise InputError(f"{name}: too short to {purpose} (needs at least two tokens)")
    return ScoredText(ids, mask, unknown, (len(text) - unknown) / max(len(ids) - unknown, 1))


def evaluate_text(run, scored: ScoredText, progress: bool = False) -> EvalResult:
    """Score a text under a loaded run as its trainer evaluated: its streams, window and precision."""
    train = run.config["train"]
    # the trainer's streams (all processes') and its precision, where this device has it
    evaluation = run.config.get("evaluation") or {}
    streams = (evaluation.get("streams") or train.get("eval_batches")
               or train["batch_size"] * run.config.get("world_size", 1))
    precision = evaluation.get("precision", "fp32")
    if precision != "fp32":
        try:
            precision = resolve_precision(precision, run.device)
        except ConfigError:
            precision = "fp32"  # trained in bf16, scored here in fp32: equal to about the third decimal
    loss_sum, count = evaluate_ids(run.model, scored.ids, seq_len=train["seq_len"], streams=streams,
                                   device=run.device, precision=precision, mask=scored.mask, progress=progress)
    return summarize(loss_sum, count, scored.chars_per_token, scored.unknown)


def evaluate_file(run_dir: str | os.PathLike, file: str | os.PathLike, *, device: str = "auto",
                  errors: str = "strict", progress: bool = False) -> EvalResult:
    """Score a whole text file under the best weights of a run, statefully (see ``read_scored_text``)."""
    from .checkpoint import load_run

    run = load_run(run_dir, resolve_device(device))
    return evaluate_text(run, read_scored_text(run, file, errors), progress)
