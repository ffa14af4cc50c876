"""A small GPT-style character-level transformer: the baseline the benchmark compares against.

Holds the model (pre-LayerNorm blocks, causal self-attention, GELU MLP, learned positions,
weight-tied head) and ``train_baseline``, which trains it under a wall-clock budget and scores
the validation split. It shares nothing with textrnn except the train/val split rule.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

_EVAL_WINDOWS_PER_BATCH = 256  # windows scored per forward pass during evaluation


@dataclass
class GPTConfig:
    """Model and optimiser settings; defaults follow nanoGPT's CPU recipe for shakespeare_char."""

    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 64  # context length in characters
    dropout: float = 0.0  # dropout on attention weights and residual branches
    bias: bool = False  # biases in Linear and LayerNorm layers (nanoGPT trains without)
    batch_size: int = 12  # windows per optimiser step
    learning_rate: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine decay ends at learning_rate * min_lr_ratio
    warmup_iters: int = 100  # optimiser steps of linear warmup
    weight_decay: float = 0.1  # AdamW decay, applied to matrices and embeddings only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 means off

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {self.block_size}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_iters, weight_decay and grad_clip must not be negative")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, n_head, T, head_size)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, vocab_size: int) -> None:
        super().__init__()
        self.block_size = config.block_size
        self.token_embedding = nn.Embedding(vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # weight tying

        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        positions = torch.arange(T, device=idx.device)  # (T,)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))  # (B, T, V)


def _learning_rate(config: GPTConfig, step: int, seconds: float, warmup_end: float | None,
                   budget: float) -> float:
    """Linear warmup over ``warmup_iters`` steps, then cosine decay laid out over the time left.

    The decay runs from the moment warmup ended (``warmup_end`` seconds of training) to the
    budget, so it reaches ``learning_rate * min_lr_ratio`` exactly when the budget runs out,
    however many steps fit.
    """
    if warmup_end is None:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    progress = min(1.0, max(0.0, (seconds - warmup_end) / max(budget - warmup_end, 1e-9)))
    min_lr = config.learning_rate * config.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.learning_rate - min_lr)


def _make_optimizer(model: GPT, config: GPTConfig) -> torch.optim.AdamW:
    # Decay matrices and embeddings; leave LayerNorm weights and biases (all 1-D) alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))


def _evaluation_windows(length: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start offsets and score masks for sliding-window evaluation of a stream of ``length``.

    Window ``w`` reads ``stream[start : start + block_size]`` and predicts
    ``stream[start + 1 : start + block_size + 1]``. Windows step by ``block_size // 2``; each
    scores only the targets no earlier window scored, so every target from index 1 to
    ``length - 1`` is scored exactly once, and all but the first window's give each scored
    target at least ``block_size // 2`` characters of context::

        stream   0 1 2 3 4 5 6 7 8 9 ...        (block_size 4, stride 2)
        window 0 [x x x x]                      scores targets 1-4
        window 1     [. . x x]                  scores targets 5-6
        window 2         [. . x x]              scores targets 7-8
        last               [. . . x]            moved back to end at the stream's end

    Returns ``starts`` (W,) and ``mask`` (W, block_size), True where a target is scored.
    """
    if length - 1 <= block_size:
        raise ValueError(f"the stream needs more than block_size + 1 = {block_size + 1} characters")
    stride = max(1, block_size // 2)
    last_start = length - 1 - block_size
    starts = list(range(0, last_start + 1, stride))
    if starts[-1] != last_start:
        starts.append(last_start)
    mask = torch.zeros(len(starts), block_size, dtype=torch.bool)
    scored_through = 0  # the highest target index scored so far
    for w, start in enumerate(starts):
        first_new = scored_through - start  # window position of the first unscored target
        mask[w, max(first_new, 0):] = True
        scored_through = start + block_size
    return torch.tensor(starts), mask


@torch.inference_mode()
def _evaluate(model: GPT, stream: torch.Tensor, block_size: int) -> float:
    """Mean cross-entropy in nats/char over every target of ``stream`` (see ``_evaluation_windows``)."""
    starts, mask = _evaluation_windows(len(stream), block_size)
    offsets = torch.arange(block_size)  # (T,)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(starts), _EVAL_WINDOWS_PER_BATCH):
        batch_starts = starts[first : first + _EVAL_WINDOWS_PER_BATCH]  # (W,)
        index = batch_starts[:, None] + offsets  # (W, T)
        x, y = stream[index], stream[index + 1]  # (W, T) each
        logits = model(x)  # (W, T, V)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (W, T)
        batch_mask = mask[first : first + _EVAL_WINDOWS_PER_BATCH]
        total += losses[batch_mask].double().sum().item()
        count += int(batch_mask.sum())
    model.train(was_training)
    assert count == len(stream) - 1, (count, len(stream))
    return total / count


def train_baseline(text: str, *, minutes: float, val_fraction: float = 0.1, seed: int = 1337,
                   eval_every_seconds: float = 30.0, config: GPTConfig | None = None,
                   log: Callable[[str], None] = print) -> list[dict]:
    """Train a GPT on ``text`` for ``minutes`` of training time and return its evaluation rows.

    The vocabulary is the sorted set of characters in the whole text; the first
    ``n - int(n * val_fraction)`` characters train and the rest validate, the same split textrnn
    uses. Training time is measured with the clock paused during evaluation: evaluation runs
    every ``eval_every_seconds`` of training time and once at the end, and its cost counts
    neither against the budget nor in the reported minutes. The cosine learning-rate schedule is
    laid out over the time budget, not over a step count.

    Each row is ``{"minutes", "step", "val_loss", "train_loss"}``: training minutes so far,
    optimiser steps so far, the loss in nats/char over every validation target (scored once,
    with sliding windows), and the mean loss of the training batches since the previous row.
    """
    config = config or GPTConfig()
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    if eval_every_seconds <= 0:
        raise ValueError(f"eval_every_seconds must be positive, got {eval_every_seconds}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    characters = sorted(set(text))
    index_of = {c: i for i, c in enumerate(characters)}
    data = torch.tensor([index_of[c] for c in text], dtype=torch.long)
    n_train = len(data) - int(len(data) * val_fraction)
    train_data, val_data = data[:n_train], data[n_train:]
    if len(train_data) <= config.block_size + 1 or len(val_data) <= config.block_size + 1:
        raise ValueError(f"train and val splits each need more than block_size + 1 = "
                         f"{config.block_size + 1} characters; got {len(train_data)} and {len(val_data)}")

    torch.manual_seed(seed)
    batch_generator = torch.Generator().manual_seed(seed)
    model = GPT(config, vocab_size=len(characters))
    optimizer = _make_optimizer(model, config)
    n_params = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    log(f"gpt baseline: {n_params:,} parameters, vocab {len(characters)}, "
        f"{len(train_data):,} train / {len(val_data):,} val characters, {torch.get_num_threads()} threads")

    budget = minutes * 60.0
    seconds, step, warmup_end = 0.0, 0, None
    next_eval = eval_every_seconds
    loss_sum, loss_steps = 0.0, 0
    rows: list[dict] = []
    model.train()
    while seconds < budget:
        started = time.perf_counter()
        if warmup_end is None and step >= config.warmup_iters:
            warmup_end = seconds
        lr = _learning_rate(config, step, seconds, warmup_end, budget)
        for group in optimizer.param_groups:
            group["lr"] = lr

        starts = torch.randint(len(train_data) - config.block_size - 1, (config.batch_size,),
                               generator=batch_generator)  # (B,)
        index = starts[:, None] + torch.arange(config.block_size)  # (B, T)
        x, y = train_data[index], train_data[index + 1]  # (B, T) each
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        step += 1
        loss_sum += loss.item()
        loss_steps += 1
        seconds += time.perf_counter() - started

        if seconds >= next_eval or seconds >= budget:
            # The training clock is paused here: `seconds` only grows inside the step above.
            val_loss = _evaluate(model, val_data, config.block_size)
            row = {"minutes": seconds / 60.0, "step": step, "val_loss": val_loss,
                   "train_loss": loss_sum / loss_steps}
            rows.append(row)
            log(f"{row['minutes']:6.2f} min  step {step:6d}  {step / seconds:6.1f} steps/s  "
                f"train {row['train_loss']:.4f}  val {val_loss:.4f}  lr {lr:.2e}")
            loss_sum, loss_steps = 0.0, 0
            while next_eval <= seconds:
                next_eval += eval_every_seconds
    return rows


def _main() -> None:
    default_data = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare.txt"
    parser = argparse.ArgumentParser(description="Train the GPT baseline under a time budget.")
    parser.add_argument("--minutes", type=float, default=1.0, help="training budget in minutes")
    parser.add_argument("--data", type=Path, default=default_data, help="UTF-8 text corpus")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2, the benchmark's CPU budget)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = args.data.read_text(encoding="utf-8")
    for row in train_baseline(text, minutes=args.minutes):
        print(row)


if __name__ == "__main__":
    _main()
