"""Sampling speed on this machine: by default a 2x512 LSTM (random weights, 65-symbol char vocabulary).

``--preset``/``--cell`` measure another model instead, such as textrnn's default (small GRU).

Rows, all in one run on the same model and weights:
  - ``Sampler.stream`` at batch 1 (what ``textrnn generate`` does) and ``generate(num_samples=32)``;
  - ``model.step`` alone at batch 1: the ceiling the sampler's own overhead is measured against;
  - a naive loop that re-runs the whole prefix every token (what a sampler without a state cache does);
  - a plain ``nn.LSTM`` (``nn.GRU``, ``nn.RNN``) called once per character, state carried: the usual hand-written loop.
Each cell is the best of ``--repeats`` short timings (the machine is shared: the best is the
least disturbed, and the load average is printed); chars/s counts generated characters only.
"fp16 weights" is ``Sampler(precision="fp16")``: fp16 copies of the recurrent matrices, fp32
arithmetic (fbgemm, x86). "onnxruntime" is ``Sampler(engine="onnxruntime")``: the step exported to
ONNX (fp32) and run by ONNX Runtime, when it is installed; a second table tries its options at
batch 1 (threads, IO binding, int8 weights). bf16 needs bf16 matrix units (AMX or AVX512-BF16); without them it
says why not.

    python bench/sampling.py                      # the table, as in BENCHMARKS.md
    python bench/sampling.py --length 4000 --repeats 9 --threads 1
    python bench/sampling.py --preset small --cell lstm          # the default model (small LSTM)
    python bench/sampling.py --preset small --cell gru --quick   # batch-1 rows only
"""

from __future__ import annotations

import argparse
import functools
import os
import string
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

from textrnn.config import PRESETS, preset  # noqa: E402
from textrnn.model import RNNLanguageModel  # noqa: E402
from textrnn.runtime import _cpu_bf16_rnn_works, cpu_has_fast_bf16  # noqa: E402
from textrnn.sampling import Sampler, fp16_weights_supported, sample_logits  # noqa: E402
from textrnn.tokenizers import CharTokenizer  # noqa: E402

try:
    from textrnn.export import OnnxStepper, onnx_available, session, step_graph  # noqa: E402
except ImportError:  # pragma: no cover
    onnx_available = None

PROMPT = "ROMEO:\n"
GOALS = {"issue 4": 2_000, "issue 7": 5_000}


def best_rate(run, chars: int, repeats: int, warm_up: bool = True) -> float:
    """Best chars/s over ``repeats`` calls of ``run()`` (after one warm-up call)."""
    if warm_up:
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return chars / best


def build(name: str = "medium", cell: str = "lstm", seed: int = 0) -> tuple[RNNLanguageModel, CharTokenizer]:
    torch.manual_seed(seed)
    tokenizer = CharTokenizer(string.ascii_letters + " \n.,;:!?'-&$")  # 64 symbols + the unknown id = 65
    config = preset(name, vocab_size=tokenizer.vocab_size, cell=cell, dropout=0.0)
    return RNNLanguageModel(config).eval(), tokenizer


def naive_prefix(model: RNNLanguageModel, tokenizer: CharTokenizer, length: int) -> None:
    """Every token re-runs the model over the whole text so far, from a fresh state."""
    generator = torch.Generator().manual_seed(0)
    ids = tokenizer.encode(PROMPT)
    with torch.inference_mode():
        for _ in range(length):
            logits, _ = model(torch.tensor([ids]))  # (1, T, V): the whole prefix, every time
            ids.append(int(sample_logits(logits[:, -1], 0.8, generator=generator)))


def plain_loop(config, length: int, seed: int = 0) -> callable:
    """The textbook loop: embedding, ``nn.LSTM`` (or GRU, RNN) on one character, linear head, multinomial."""
    torch.manual_seed(seed)
    rnn_class = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
    vocab, hidden = config.vocab_size, config.hidden_size
    embedding, head = nn.Embedding(vocab, config.embedding_dim), nn.Linear(hidden, vocab)
    lstm = rnn_class(config.embedding_dim, hidden, config.num_layers, batch_first=True)

    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            x, state = torch.tensor([[1]]), None
            for _ in range(length):
                out, state = lstm(embedding(x), state)
                probs = torch.softmax(head(out[:, -1]) / 0.8, -1)
                x = torch.multinomial(probs, 1, generator=generator)

    return run


def ort_experiments(model: RNNLanguageModel, length: int, repeats: int) -> list[tuple[str, float, str]]:
    """ONNX Runtime's step alone at batch 1, under its options: steps/s and the largest logit change."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    graph = step_graph(model)
    c = model.config
    lstm = c.cell == "lstm"
    shape = (c.num_layers, 1, c.hidden_size)

    def feeds():
        return {"ids": np.zeros(1, np.int64), "h": np.zeros(shape, np.float32),
                **({"c": np.zeros(shape, np.float32)} if lstm else {})}

    def plain(sess):
        def run():
            state = feeds()
            for _ in range(length):
                out = sess.run(None, state)
                state = {"ids": state["ids"], "h": out[1], **({"c": out[2]} if lstm else {})}
        return run

    def io_bound(sess):
        """Inputs and outputs bound once to buffers that swap roles every step: no allocation per call."""
        names = ["h", "c"] if lstm else ["h"]
        buffers = [{n: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for n in names} for _ in range(2)]
        ids = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64))
        logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, c.vocab_size), np.float32))
        bindings = []
        for k in range(2):
            binding = sess.io_binding()
            binding.bind_ortvalue_input("ids", ids)
            for n in names:
                binding.bind_ortvalue_input(n, buffers[k][n])
                binding.bind_ortvalue_output(n + "_out", buffers[1 - k][n])
            binding.bind_ortvalue_output("logits", logits)
            bindings.append(binding)

        def run():
            for t in range(length):
                sess.run_with_iobinding(bindings[t % 2])
        return run

    reference = session(graph, 1).run(None, feeds())[0]
    rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        sess = session(graph, threads)
        rows.append((f"session.run, {threads} thread(s)", best_rate(plain(sess), length, repeats), "fp32, exact"))
        rows.append((f"IO binding, {threads} thread(s)", best_rate(io_bound(sess), length, repeats), "fp32, exact"))
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "fp32.onnx").write_bytes(graph)
            quantize_dynamic(str(Path(tmp) / "fp32.onnx"), str(Path(tmp) / "int8.onnx"), weight_type=QuantType.QInt8)
            for threads in sorted({1, torch.get_num_threads()}):
                sess = session(Path(tmp) / "int8.onnx", threads)
                change = float(np.abs(sess.run(None, feeds())[0] - reference).max())
                rows.append((f"int8 weights (quantize_dynamic), {threads} thread(s)",
                             best_rate(plain(sess), length, repeats), f"logits change by up to {change:.2g}"))
    except Exception as exc:  # noqa: BLE001 - an experiment: say why not
        rows.append(("int8 weights (quantize_dynamic)", float("nan"), f"failed: {exc}"[:80]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1000, help="characters per timed call (batch 1)")
    parser.add_argument("--batch", type=int, default=32, help="samples in the batched row")
    parser.add_argument("--batch-length", type=int, default=200, help="characters per sample in the batched row")
    parser.add_argument("--naive-length", type=int, default=150,
                        help="characters for the re-run-the-prefix row (timed once: it is slow)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per cell; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="only the batch-1 stream and step rows")
    parser.add_argument("--preset", choices=list(PRESETS), default="medium", help="model size (medium = 2x512)")
    parser.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_at_start = f"{os.getloadavg()[0]:.1f}"  # the machine is shared: say how busy it was
    model, tokenizer = build(args.preset, args.cell)
    c = model.config
    described = f"{c.num_layers}x{c.hidden_size} {c.cell.upper()}, embedding {c.embedding_dim}"
    precisions = ["fp32"] + (["fp16"] if fp16_weights_supported() else [])
    samplers = {p: Sampler(model, tokenizer, precision=p, engine="torch") for p in precisions}
    if onnx_available is not None and onnx_available():  # the onnxruntime engine: one more column
        samplers["onnxruntime"] = Sampler(model, tokenizer, precision="fp32", engine="onnxruntime")
        precisions.append("onnxruntime")
        graph = step_graph(model)
    options = dict(temperature=0.8, seed=1)
    filtered = dict(temperature=0.8, top_k=40, top_p=0.95, seed=1)
    rows: list[tuple[str, dict[str, float], str]] = []

    def measure(name: str, make_run, chars: int, note: str, only_fp32: bool = False,
                repeats: int | None = None) -> dict[str, float]:
        rates = {p: best_rate(make_run(p), chars, repeats or args.repeats, warm_up=repeats is None)
                 for p in (["fp32"] if only_fp32 else precisions)}
        rows.append((name, rates, note))
        return rates

    def stream_run(p):
        return lambda: sum(1 for _ in samplers[p].stream(PROMPT, length=args.length, **options))

    stream = measure("Sampler.stream, batch 1", stream_run, args.length, "what `textrnn generate` does")
    if not args.quick:
        measure("Sampler.generate, batch 1, top-k 40 + top-p 0.95",
                lambda p: lambda: samplers[p].generate(PROMPT, length=args.length, **filtered), args.length,
                "the filters sort 65 logits per token")
        measure(f"Sampler.generate, batch {args.batch}",
                lambda p: lambda: samplers[p].generate(PROMPT, length=args.batch_length, num_samples=args.batch,
                                                       **options),
                args.batch * args.batch_length, f"{args.batch} samples as one batch")

    def steps_only(p, threads):
        if p == "onnxruntime":
            step = OnnxStepper(graph, c.cell == "lstm", threads=threads, one_thread_at_batch_1=False)
        else:
            step = functools.partial(model.step, precision=p)

        def run() -> None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                state, ids = model.init_state(1), torch.tensor([1])
                for _ in range(args.length):
                    _, state = step(ids, state)
            finally:
                torch.set_num_threads(before)
        return run

    for threads in sorted({1, torch.get_num_threads()}):
        measure(f"model.step alone, batch 1, {threads} thread{'s' if threads > 1 else ''}",
                lambda p: steps_only(p, threads), args.length,
                "no sampling: the ceiling for the sampler, which steps on one thread at batch 1" if threads == 1
                else "a little faster when the machine is idle; many times slower when another process is busy")
    if not args.quick:
        naive = measure(f"naive: re-run the whole prefix per token ({args.naive_length} chars)",
                        lambda p: lambda: naive_prefix(model, tokenizer, args.naive_length), args.naive_length,
                        "a sampler without a state cache; falls as the text grows", only_fp32=True, repeats=1)
        rows[-1] = (rows[-1][0], rows[-1][1], rows[-1][2] + f"; {stream['fp32'] / naive['fp32']:.0f}x slower "
                    f"than carrying the state")
        measure(f"plain nn.{c.cell.upper()} per character, batch 1",
                lambda p: plain_loop(c, args.length), args.length, "the usual hand-written loop (oneDNN per call)",
                only_fp32=True)

    if cpu_has_fast_bf16() and _cpu_bf16_rnn_works():
        bf16 = "not measured: no bf16 sampling path yet (batch 1 is bound by reading the weights)"
    else:
        bf16 = "n/a on this CPU: no AMX or AVX512-BF16, so oneDNN has no bf16 kernels here"

    print(f"# sampling speed: {described}, vocab {tokenizer.vocab_size}, random weights")
    print(f"# machine: {machine()}; load average {load_at_start} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"# command: python bench/sampling.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# best of {args.repeats} timings per cell; batch-1 rows generate {args.length} characters after a "
          f"{len(PROMPT)}-character prompt; fp16 = fp16 copies of the recurrent weights, fp32 arithmetic")
    print()
    width = max(len(r[0]) for r in rows)
    print(f"| {'path':<{width}} | fp32 chars/s | fp16 weights chars/s | onnxruntime chars/s | bf16 | note |")
    print(f"|{'-' * (width + 2)}|-------------:|---------------------:|--------------------:|------|------|")
    for name, rates, note in rows:
        fp16 = f"{rates['fp16']:,.0f}" if "fp16" in rates else "-"
        onnx = f"{rates['onnxruntime']:,.0f}" if "onnxruntime" in rates else "-"
        print(f"| {name:<{width}} | {rates['fp32']:>12,.0f} | {fp16:>20} | {onnx:>19} | n/a | {note} |")
    print()
    print(f"bf16: {bf16}")
    for issue, goal in GOALS.items():
        for p in precisions:
            verdict = "met" if stream[p] >= goal else "NOT met"
            print(f"goal ({issue}): >= {goal:,} chars/s streamed at batch 1, {p}: {verdict} ({stream[p]:,.0f})")
    if "onnxruntime" in stream:
        best_torch = max(stream[p] for p in precisions if p != "onnxruntime")
        ratio = stream["onnxruntime"] / best_torch
        print(f"goal: onnxruntime >= 1.5x the best torch path at batch 1: "
              f"{'met' if ratio >= 1.5 else 'NOT met'} ({ratio:.2f}x)")
        if not args.quick:
            print()
            print("| onnxruntime step alone, batch 1 | steps/s | note |")
            print("|---|---:|---|")
            for name, rate, note in ort_experiments(model, args.length, args.repeats):
                print(f"| {name} | {rate:,.0f} | {note} |")


if __name__ == "__main__":
    main()
