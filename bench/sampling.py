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
ONNX (fp32) and run by ONNX Runtime, when it is installed; "int8" is ``Sampler(precision="int8")``:
the same engine with int8 weights (``export.quantized_graph``). A second table tries ONNX Runtime's
options at batch 1 (threads, IO binding, int8 weights). bf16 needs bf16 matrix units (AMX or
AVX512-BF16); without them it says why not.

``--run RUN_DIR`` adds what each step path costs in quality: the validation loss of a trained run
(its own split, the first ``--val-chars`` characters in 16 streams, state carried) through every
step path, so the int8 weights' loss is measured, not assumed.

    python bench/sampling.py                      # the table, as in BENCHMARKS.md
    python bench/sampling.py --length 4000 --repeats 9 --threads 1
    python bench/sampling.py --preset small --cell lstm          # the default model (small LSTM)
    python bench/sampling.py --preset small --cell gru --quick   # batch-1 rows only
    python bench/sampling.py --quick --run runs/medium           # + each path's val loss on a trained run
"""

from __future__ import annotations

import argparse
import os
import string
import sys
import time
from pathlib import Path

import numpy as np
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
    from textrnn.export import OnnxStepper, onnx_available, quantized_graph, session, step_graph  # noqa: E402
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


def step_losses(model: RNNLanguageModel, run_dir: Path, steps: dict, chars: int, streams: int = 16) -> dict:
    """Validation loss (nats/char) of a char run through each step function, state carried per stream."""
    from textrnn.data import load_dataset

    data = load_dataset(run_dir / "data") if (run_dir / "data").exists() else None
    if data is None:  # a run trained on a text file keeps its prepared data elsewhere: config.json says where
        import json

        data = load_dataset(json.loads((run_dir / "config.json").read_text())["data"]["path"])
    ids = torch.from_numpy(np.asarray(data.split("val")[:chars], dtype=np.int64))
    length = len(ids) // streams
    ids = ids[:streams * length].view(streams, length)  # contiguous streams, like the trainer's evaluation
    losses = {}
    with torch.inference_mode():
        for name, step in steps.items():
            state, total = model.init_state(streams), 0.0
            for t in range(length - 1):
                logits, state = step(ids[:, t], state)
                total += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t + 1], reduction="sum"))
            losses[name] = total / (streams * (length - 1))
    return losses


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

    rows = []
    for threads in sorted({1, torch.get_num_threads()}):
        sess = session(graph, threads)
        rows.append((f"session.run, {threads} thread(s)", best_rate(plain(sess), length, repeats), "fp32, exact"))
        rows.append((f"IO binding, {threads} thread(s)", best_rate(io_bound(sess), length, repeats), "fp32, exact"))
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        variants = {  # quantize_dynamic's options; the first is what --precision int8 runs
            "int8, a scale per row, head fp32": dict(per_channel=True, nodes_to_exclude=["logits", "logits_MatMul"]),
            "int8, one scale per matrix, head fp32": dict(nodes_to_exclude=["logits", "logits_MatMul"]),
            "int8, one scale per matrix, head int8 too": {},
            "uint8 weights, one scale per matrix, head fp32": dict(weight_type=QuantType.QUInt8,
                                                                   nodes_to_exclude=["logits", "logits_MatMul"]),
        }
        for name, options in variants.items():
            with tempfile.TemporaryDirectory() as tmp:
                quantize_dynamic(onnx.load_from_string(graph), Path(tmp) / "q.onnx",
                                 op_types_to_quantize=["Gemm", "MatMul"], **{"weight_type": QuantType.QInt8, **options})
                quantized = (Path(tmp) / "q.onnx").read_bytes()
            change = max_logit_change(model, quantized)
            for threads in sorted({1, torch.get_num_threads()}):
                rows.append((f"{name}, IO binding, {threads} thread(s)",
                             best_rate(io_bound(session(quantized, threads)), length, repeats),
                             f"logits change by up to {change:.2g} over 200 random ids"))
    except Exception as exc:  # noqa: BLE001 - an experiment: say why not
        rows.append(("int8 weights (quantize_dynamic)", float("nan"), f"failed: {exc}"[:80]))
    return rows


def max_logit_change(model: RNNLanguageModel, graph: bytes, steps: int = 200, batch: int = 8) -> float:
    """The largest logit difference between a (quantized) step graph and the fp32 model, state carried."""
    ids = torch.randint(0, model.config.vocab_size, (batch, steps), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(ids)[0]
    step, state, worst = OnnxStepper(graph, model.config.cell == "lstm", threads=1).loop(), model.init_state(batch), 0.0
    for t in range(steps):
        logits, state = step(ids[:, t], state)
        worst = max(worst, float((logits - expected[:, t]).abs().max()))
    return worst


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
    parser.add_argument("--run", type=Path, default=None,
                        help="a trained run: time its model instead, and add each path's val loss on its data")
    parser.add_argument("--val-chars", type=int, default=32_000, help="validation characters for --run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_at_start = f"{os.getloadavg()[0]:.1f}"  # the machine is shared: say how busy it was
    if args.run:
        from textrnn.checkpoint import load_run

        run = load_run(args.run, "cpu")
        model, tokenizer, weights = run.model.eval(), run.tokenizer, f"trained weights of {args.run}"
    else:
        model, tokenizer = build(args.preset, args.cell)
        weights = "random weights"
    c = model.config
    described = f"{c.num_layers}x{c.hidden_size} {c.cell.upper()}, embedding {c.embedding_dim}"
    precisions = ["fp32"] + (["fp16"] if fp16_weights_supported() else [])
    samplers = {p: Sampler(model, tokenizer, precision=p, engine="torch") for p in precisions}
    if onnx_available is not None and onnx_available():  # the onnxruntime engine: two more columns
        samplers["onnxruntime"] = Sampler(model, tokenizer, precision="fp32", engine="onnxruntime")
        samplers["int8"] = Sampler(model, tokenizer, precision="int8", engine="onnxruntime")
        precisions += ["onnxruntime", "int8"]
        graph = step_graph(model)
        graph_int8 = quantized_graph(graph)
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

    def step_for(p, threads=None):
        """The step of path ``p`` as its sampler runs it (onnxruntime: bound buffers, ``threads`` threads)."""
        if p in ("onnxruntime", "int8"):
            return OnnxStepper(graph if p == "onnxruntime" else graph_int8, c.cell == "lstm", threads=threads,
                               batch_1_threads=threads).loop()
        return model.stepper(p)

    def steps_only(p, threads):
        step = step_for(p, threads)

        def run() -> None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                state, ids = model.init_state(1), torch.tensor([1])
                with torch.inference_mode():
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

    print(f"# sampling speed: {described}, vocab {tokenizer.vocab_size}, {weights}")
    print(f"# machine: {machine()}; load average {load_at_start} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"# command: python bench/sampling.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# best of {args.repeats} timings per cell; batch-1 rows generate {args.length} characters after a "
          f"{len(PROMPT)}-character prompt; fp16 = fp16 copies of the recurrent weights, fp32 arithmetic")
    print()
    width = max(len(r[0]) for r in rows)
    print(f"| {'path':<{width}} | fp32 chars/s | fp16 weights | onnxruntime | onnxruntime int8 | bf16 | note |")
    print(f"|{'-' * (width + 2)}|-------------:|-------------:|------------:|-----------------:|------|------|")
    for name, rates, note in rows:
        cells = [f"{rates[p]:,.0f}" if p in rates else "-" for p in ("fp16", "onnxruntime", "int8")]
        print(f"| {name:<{width}} | {rates['fp32']:>12,.0f} | {cells[0]:>12} | {cells[1]:>11} | {cells[2]:>16} "
              f"| n/a | {note} |")
    print()
    print(f"bf16: {bf16}")
    for issue, goal in GOALS.items():
        for p in precisions:
            verdict = "met" if stream[p] >= goal else "NOT met"
            print(f"goal ({issue}): >= {goal:,} chars/s streamed at batch 1, {p}: {verdict} ({stream[p]:,.0f})")
    if "onnxruntime" in stream:
        best_torch = max(stream[p] for p in ("fp32", "fp16") if p in stream)
        for p in ("onnxruntime", "int8"):
            ratio = stream[p] / best_torch
            print(f"goal: {p} >= 1.5x the best torch path at batch 1: {'met' if ratio >= 1.5 else 'NOT met'} "
                  f"({ratio:.2f}x)")
    if args.run:
        print()
        print(f"| step path | val loss, nats/char (first {args.val_chars:,} chars of the run's validation split) "
              f"| change |")
        print("|---|---:|---:|")
        losses = step_losses(model, args.run, {p: step_for(p) for p in precisions}, args.val_chars)
        for p, loss in losses.items():
            print(f"| {p} | {loss:.4f} | {loss - losses['fp32']:+.4f} |")
        if not args.quick:
            print()
            print("| onnxruntime step alone, batch 1 | steps/s | note |")
            print("|---|---:|---|")
            for name, rate, note in ort_experiments(model, args.length, args.repeats):
                print(f"| {name} | {rate:,.0f} | {note} |")


if __name__ == "__main__":
    main()
