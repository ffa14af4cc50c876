"""Training throughput: textrnn's real training loop next to a plain ``nn.LSTM`` loop of the same
shape, and model FLOP utilisation against this machine's measured matmul peak.

Rows, all in one run:
  - the matmul peak: the best GFLOP/s of square ``torch.mm`` in fp32 and in bf16 (without bf16
    matrix units, AMX or AVX512-BF16, the bf16 figure shows how slowly it is emulated);
  - bf16 training rows only where the CPU has those units and oneDNN runs bf16 recurrent layers;
    elsewhere they show n/a and the reason;
  - for the default preset and for a 2x512 LSTM, at the default batch and window: training
    chars/s of ``textrnn.training.train`` itself (the real loop: windows from the memmapped
    split, forward, loss, backward, clip, AdamW, metrics), and of a plain loop written below
    (embedding -> ``nn.LSTM`` -> linear, seq-first like pytorch/examples, the same dropout,
    default AdamW, clip, ``loss.item()``), and their ratio, ours / plain (goal >= 1.0).

The two run interleaved, one step each in turn: ``train`` calls its ``should_stop`` hook at
every step boundary, and the hook runs one plain step. So both see the same machine at the
same moments (it is shared, and its load swings by several times within a minute). A textrnn
step is the time from the hook's return to its next call. The first two steps of each are
warm-up (oneDNN primitives, the allocator). chars/s is that of the median step, with the best
step (the least disturbed) beside it; the ratio is the median over step pairs of plain step time
/ textrnn step time, each pair run back to back, so that the load of the moment cancels; the cpu
ratio is the same in process CPU time, which other people's work on the machine disturbs less.

Model FLOPs per token are counted as 6 x the weights that take part in a matmul: every
recurrent ``weight_ih``/``weight_hh``, the head, and the tied projection when there is one
(2 FLOPs per weight forward, 4 backward, for the gradients of inputs and of weights). The
embedding (a lookup), the biases, the gate nonlinearities, the softmax and the optimizer are
left out, so this is a lower bound of the work done. MFU = the FLOP rate of textrnn's best step / the
best matmul peak, measured before and after the training runs (both the least disturbed).

    python bench/train_throughput.py                    # the table, as in BENCHMARKS.md
    python bench/train_throughput.py --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

from textrnn.config import DEFAULT_PRESET, ModelConfig, TrainConfig, preset  # noqa: E402
from textrnn.data import load_dataset, preprocess  # noqa: E402
from textrnn.runtime import _cpu_bf16_rnn_works, cpu_has_fast_bf16  # noqa: E402
from textrnn.training import train  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GOAL = 1.0
WARMUP_STEPS = 2


# ---------------------------------------------------------------- the machine's limit

def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 2.0) -> float:
    """Best GFLOP/s of ``size x size @ size x size`` over about ``seconds`` of repeats."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: first-call dispatch and packing
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def bf16_status() -> str | None:
    """None when bf16 can be measured here; otherwise why not."""
    if not cpu_has_fast_bf16():
        return "no AMX or AVX512-BF16 on this CPU"
    if not _cpu_bf16_rnn_works():
        return "oneDNN refuses bf16 recurrent layers here"
    return None


def matmul_weights(config: ModelConfig) -> int:
    """Weights that take part in a matmul: recurrent layers, head, tied projection (no embedding, no biases)."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[config.cell]
    h, e, v = config.hidden_size, config.embedding_dim, config.vocab_size
    count = sum(gates * h * ((e if layer == 0 else h) + h) for layer in range(config.num_layers))
    if config.tie_weights:
        return count + v * e + (h * e if h != e else 0)
    return count + v * h


# ---------------------------------------------------------------- plain: a hand-written nn.LSTM loop

class PlainLSTM(nn.Module):
    """Embedding -> nn.LSTM -> linear, seq-first, dropout on input, between layers and on output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.lstm = nn.LSTM(config.embedding_dim, config.hidden_size, config.num_layers,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x, state):
        out, state = self.lstm(self.drop(self.embedding(x)), state)  # (L, B, H)
        return self.head(self.drop(out)), state  # (L, B, V)


class PlainLoop:
    """The usual truncated-BPTT loop over ``batch`` columns of the ids, one ``step()`` at a time."""

    def __init__(self, ids: np.ndarray, config: ModelConfig, train_config: TrainConfig, precision: str):
        self.batch, self.seq_len, self.clip = train_config.batch_size, train_config.seq_len, train_config.grad_clip
        self.vocab = config.vocab_size
        self.model = PlainLSTM(config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_config.lr)
        columns = len(ids) // self.batch
        self.data = torch.from_numpy(ids[: columns * self.batch].astype(np.int64)).view(self.batch, columns).t()
        self.data = self.data.contiguous()  # (N, B): column b is stream b
        self.bf16 = precision == "bf16"
        self.state = None
        self.position = 0

    def step(self) -> None:
        """One training step."""
        i = self.position
        self.position = (self.position + self.seq_len) % (len(self.data) - self.seq_len - 1)
        x, y = self.data[i:i + self.seq_len], self.data[i + 1:i + 1 + self.seq_len]  # (L, B)
        state = None if self.state is None else tuple(s.detach() for s in self.state)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits, self.state = self.model(x, state)
        loss = F.cross_entropy(logits.float().view(-1, self.vocab), y.reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        loss.item()


# ---------------------------------------------------------------- ours and plain, interleaved

def measure(data_dir: Path, ids: np.ndarray, config: ModelConfig, train_config: TrainConfig, steps: int,
            precision: str) -> dict[str, np.ndarray]:
    """Seconds of each timed step of textrnn's ``train`` and of the plain loop, run in turn.

    Keys ``ours``/``plain`` hold wall-clock seconds, ``ours_cpu``/``plain_cpu`` process CPU seconds.
    """
    torch.manual_seed(0)
    plain = PlainLoop(ids, config, train_config, precision)
    marks: list[tuple[float, float, float, float]] = []  # wall and CPU clocks as the hook enters and returns

    def between_steps(step: int) -> bool:
        entered = (time.perf_counter(), time.process_time())
        plain.step()
        marks.append((*entered, time.perf_counter(), time.process_time()))
        return False

    run_config = TrainConfig(**{**train_config.to_dict(), "max_steps": steps + WARMUP_STEPS, "eval_every": 10**9,
                                "log_every": 10**9, "device": "cpu", "precision": precision})
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        train([data_dir], Path(tmp) / "run", ModelConfig(**config.to_dict()), run_config,
              should_stop=between_steps)
    m = np.array(marks)  # (steps + 3, 4): one hook call before each step and one after the last
    timed = slice(WARMUP_STEPS, WARMUP_STEPS + steps)  # plain step i runs just before textrnn step i
    return {"plain": (m[:, 2] - m[:, 0])[timed], "ours": (m[1:, 0] - m[:-1, 2])[timed],
            "plain_cpu": (m[:, 3] - m[:, 1])[timed], "ours_cpu": (m[1:, 1] - m[:-1, 3])[timed]}


def paired_ratio(ours_times: np.ndarray, plain_times: np.ndarray) -> float:
    """Median over back-to-back step pairs of plain seconds / textrnn seconds (> 1: textrnn is faster)."""
    return float(np.median(plain_times / ours_times))


# ---------------------------------------------------------------- the table

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed training steps of each loop per model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    print(f"machine: {machine()}")
    why_not_bf16 = bf16_status()
    precisions = ["fp32"] + (["bf16"] if why_not_bf16 is None else [])
    # both peaks always: without bf16 units the bf16 one shows what autocast would run at here
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in ("fp32", "bf16")}

    with tempfile.TemporaryDirectory(prefix="throughput-data-") as tmp:
        if CORPUS.is_file():
            source = CORPUS
        else:
            source = Path(tmp) / "random.txt"
            letters = list("abcdefghijklmnopqrstuvwxyz .,;:!?\n")
            source.write_text("".join(np.random.default_rng(0).choice(letters, 1_000_000)), encoding="utf-8")
        # a small val split, so the final evaluation that train() always runs costs little
        data_dir = preprocess([source], Path(tmp) / "data", val_fraction=0.01)
        dataset = load_dataset(data_dir)
        vocab, chars_per_token = dataset.tokenizer.vocab_size, dataset.chars_per_token("train")
        train_ids = np.asarray(dataset.split("train"))

        default = preset(DEFAULT_PRESET, vocab_size=vocab)
        lstm_2x512 = ModelConfig(**{**default.to_dict(), "cell": "lstm", "num_layers": 2, "hidden_size": 512})
        models = [(f"default ({DEFAULT_PRESET})", default), ("lstm 2x512", lstm_2x512)]
        train_config = TrainConfig()  # the default seq_len, batch_size, lr and clip
        measured: dict[tuple, dict[str, np.ndarray]] = {}
        for _, config in models:
            for precision in precisions:
                key = (tuple(sorted(config.to_dict().items())), precision)
                if key not in measured:
                    measured[key] = measure(data_dir, train_ids, config, train_config, args.steps, precision)
    for precision in peaks:  # again at the end: the best of both is the least disturbed
        peaks[precision] = max(peaks[precision], matmul_peak(torch.float32 if precision == "fp32" else torch.bfloat16))

    print(f"matmul peak (1024x1024 torch.mm, best of repeats before and after): fp32 {peaks['fp32']:.0f} GFLOP/s; "
          + f"bf16 {peaks['bf16']:.0f} GFLOP/s" + (f" (bf16 training n/a: {why_not_bf16})" if why_not_bf16 else ""))
    print(f"data: {source.name}, char vocab {vocab}, {len(train_ids):,} training tokens")
    print(f"training at batch {train_config.batch_size} x seq_len {train_config.seq_len}, {args.steps} timed steps of "
          f"each loop per model, interleaved step by step.\nchars/s: median step (best step); ratio: median over "
          f"step pairs of plain time / textrnn time (wall clock; cpu: process CPU time, which a busy machine disturbs "
          f"less); GFLOP/s and MFU: textrnn's best step against the best peak\n")
    header = (f"{'model':<17} {'config':<30} {'prec':<5} {'textrnn chars/s':>21} {'plain chars/s':>21} "
              f"{'ratio':>6} {'cpu ratio':>9} {'MFLOP/char':>10} {'GFLOP/s':>8} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    chars_per_step = train_config.batch_size * train_config.seq_len * chars_per_token
    shown = set()
    for name, config in models:
        shape = (f"{config.cell} {config.num_layers}x{config.hidden_size} emb {config.embedding_dim} "
                 f"drop {config.dropout}" + (" tied" if config.tie_weights else ""))
        flops_per_char = 6 * matmul_weights(config) / chars_per_token
        for precision in ("fp32", "bf16"):
            key = (tuple(sorted(config.to_dict().items())), precision)
            if key not in measured:
                print(f"{name:<17} {shape:<30} {precision:<5} {'n/a':>21} {'n/a':>21} {'':>6} {'':>9} "
                      f"{flops_per_char / 1e6:>10.1f} {'n/a':>8} {'n/a':>6}")
                continue
            times = measured[key]
            ours_times, plain_times = times["ours"], times["plain"]
            ours_rate, plain_rate = chars_per_step / np.median(ours_times), chars_per_step / np.median(plain_times)
            ours_best, plain_best = chars_per_step / min(ours_times), chars_per_step / min(plain_times)
            achieved = ours_best * flops_per_char / 1e9
            note = "  (the same model as above: measured once)" if key in shown else ""
            shown.add(key)
            print(f"{name:<17} {shape:<30} {precision:<5} {ours_rate:>10,.0f} ({ours_best:>7,.0f}) "
                  f"{plain_rate:>10,.0f} ({plain_best:>7,.0f}) {paired_ratio(ours_times, plain_times):>6.2f} "
                  f"{paired_ratio(times['ours_cpu'], times['plain_cpu']):>9.2f} "
                  f"{flops_per_char / 1e6:>10.1f} {achieved:>8.1f} {achieved / peaks[precision]:>6.1%}{note}")
    ratios = [paired_ratio(times["ours"], times["plain"]) for times in measured.values()]
    print(f"\ngoal textrnn / plain >= {GOAL:.1f}: {'met' if min(ratios) >= GOAL else 'NOT met'} "
          f"(lowest ratio {min(ratios):.2f}); bench took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
