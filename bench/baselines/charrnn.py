"""The char-rnn recipe in plain PyTorch: the second baseline the quality benchmark compares against.

Karpathy's char-rnn (Torch7, 2015) with its own defaults, as a user who ports it would run it:

- one-hot characters into a 2-layer LSTM of 128 units, a linear head, no dropout;
- every parameter uniform in [-0.08, 0.08], the first layer's forget-gate bias at 1;
- the training text cut into 50 contiguous rows, read 50 characters at a time, the state carried
  from one batch to the next (never reset, as char-rnn does);
- RMSprop at 2e-3 (squared-gradient decay 0.95), every gradient clamped to [-5, 5] elementwise;
- the learning rate times 0.97 after every epoch from the 10th on;
- fp32, as written.

One change: char-rnn validates on its own last 5%; here it trains on the first 90% and validates on
the last 10%, the split textrnn and the GPT baseline use. Its schedule does not depend on the
budget, so one long run reports every shorter budget too (``eval_at_minutes``). It shares nothing
with textrnn. Run it with ``python bench/quality.py --only charrnn``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

_EVAL_STREAMS = 50  # contiguous validation streams scored side by side


@dataclass
class CharRNNConfig:
    """char-rnn's command-line defaults (train.lua)."""

    rnn_size: int = 128
    num_layers: int = 2
    seq_length: int = 50
    batch_size: int = 50
    learning_rate: float = 2e-3
    learning_rate_decay: float = 0.97
    learning_rate_decay_after: int = 10  # epochs
    decay_rate: float = 0.95  # RMSprop's squared-gradient average
    grad_clip: float = 5.0  # elementwise
    init_range: float = 0.08


class CharRNN(nn.Module):
    """One-hot input -> stacked LSTM -> linear head (char-rnn's model.LSTM with its softmax as the loss)."""

    def __init__(self, vocab_size: int, config: CharRNNConfig) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.lstm = nn.LSTM(vocab_size, config.rnn_size, config.num_layers, batch_first=True)
        self.head = nn.Linear(config.rnn_size, vocab_size)
        for param in self.parameters():
            nn.init.uniform_(param, -config.init_range, config.init_range)
        hidden = config.rnn_size
        for k in range(config.num_layers):  # char-rnn sets the input-to-hidden forget biases to 1
            getattr(self.lstm, f"bias_ih_l{k}").data[hidden:2 * hidden] = 1.0

    def forward(self, ids: torch.Tensor, state):
        x = F.one_hot(ids, self.vocab_size).float()  # (B, T, V)
        out, state = self.lstm(x, state)  # (B, T, H)
        return self.head(out), state  # (B, T, V)


@torch.inference_mode()
def _evaluate(model: CharRNN, stream: torch.Tensor, seq_length: int) -> float:
    """Mean cross-entropy in nats/char over every target of ``stream``, read as 50 contiguous parts
    side by side, each from a zero state with its state carried."""
    was_training = model.training
    model.eval()
    targets = len(stream) - 1
    part = targets // _EVAL_STREAMS
    rows = [(s * part, (s + 1) * part) for s in range(_EVAL_STREAMS)]
    if targets % _EVAL_STREAMS:
        rows.append((_EVAL_STREAMS * part, targets))  # the remainder: one more stream, alone
    total, count = 0.0, 0
    for group in (rows[:_EVAL_STREAMS], rows[_EVAL_STREAMS:]):
        if not group:
            continue
        length = group[0][1] - group[0][0]
        x = torch.stack([stream[a:a + length] for a, _ in group])  # (S, L)
        y = torch.stack([stream[a + 1:a + 1 + length] for a, _ in group])  # (S, L)
        state = None
        for t in range(0, length, seq_length):
            logits, state = model(x[:, t:t + seq_length], state)
            total += F.cross_entropy(logits.transpose(1, 2), y[:, t:t + seq_length], reduction="sum").item()
            count += y[:, t:t + seq_length].numel()
    model.train(was_training)
    assert count == targets, (count, targets)
    return total / count


def train_charrnn(text: str, *, minutes: float, val_fraction: float = 0.1, seed: int = 123,
                  eval_every_seconds: float = 60.0, eval_at_minutes: Iterable[float] = (),
                  config: CharRNNConfig | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train char-rnn's recipe on ``text`` for ``minutes`` of training time; its evaluation rows.

    The clock pauses while it evaluates (every ``eval_every_seconds`` of training, at each of
    ``eval_at_minutes`` and at the end), as the GPT baseline's does. Rows are
    ``{"minutes", "step", "epoch", "val_loss", "train_loss"}``, the loss in nats/char over the
    validation split.
    """
    config = config or CharRNNConfig()
    characters = sorted(set(text))
    index_of = {c: i for i, c in enumerate(characters)}
    data = torch.tensor([index_of[c] for c in text], dtype=torch.long)
    n_train = len(data) - int(len(data) * val_fraction)
    train_data, val_data = data[:n_train], data[n_train:]
    rows_len = (n_train - 1) // config.batch_size
    steps_per_epoch = rows_len // config.seq_length
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training characters are too few for {config.batch_size} x {config.seq_length}")
    usable = config.batch_size * steps_per_epoch * config.seq_length
    x_all = train_data[:usable].view(config.batch_size, -1)  # (B, N): 50 contiguous rows
    y_all = train_data[1:usable + 1].view(config.batch_size, -1)

    torch.manual_seed(seed)
    model = CharRNN(len(characters), config)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.learning_rate, alpha=config.decay_rate, eps=1e-8)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"char-rnn recipe: {n_params:,} parameters, vocab {len(characters)}, {len(train_data):,} train / "
        f"{len(val_data):,} val characters, {torch.get_num_threads()} threads")

    budget = minutes * 60.0
    marks = sorted(m * 60.0 for m in eval_at_minutes if 0 < m * 60.0 < budget)
    seconds, step, lr = 0.0, 0, config.learning_rate
    next_eval = eval_every_seconds
    loss_sum, loss_steps = 0.0, 0
    rows: list[dict] = []
    state = None
    model.train()
    while seconds < budget:
        started = time.perf_counter()
        column = (step % steps_per_epoch) * config.seq_length
        x = x_all[:, column:column + config.seq_length]  # (B, T)
        y = y_all[:, column:column + config.seq_length]
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)  # carried to the next batch
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        if step % steps_per_epoch == 0 and step // steps_per_epoch >= config.learning_rate_decay_after:
            lr *= config.learning_rate_decay
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss_sum += loss.item()
        loss_steps += 1
        seconds += time.perf_counter() - started

        at_mark = bool(marks) and seconds >= marks[0]
        if seconds >= next_eval or seconds >= budget or at_mark:
            val_loss = _evaluate(model, val_data, config.seq_length)  # the clock is paused here
            row = {"minutes": seconds / 60.0, "step": step, "epoch": step / steps_per_epoch, "val_loss": val_loss,
                   "train_loss": loss_sum / loss_steps}
            rows.append(row)
            log(f"{row['minutes']:6.2f} min  step {step:6d}  epoch {row['epoch']:5.1f}  train "
                f"{row['train_loss']:.4f}  val {val_loss:.4f}  lr {lr:.2e}")
            loss_sum, loss_steps = 0.0, 0
            while next_eval <= seconds:
                next_eval += eval_every_seconds
            while marks and marks[0] <= seconds:
                marks.pop(0)
    return rows

