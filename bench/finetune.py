"""Fine-tuning against training from scratch, at equal time, on a corpus new to the base model.

A base run (tiny Shakespeare: ``textrnn train data/tinyshakespeare.txt --max-time 3m --out /tmp/base``)
is fine-tuned with ``init_from`` on a new corpus for ``--seconds``; then the same model shape trains
from scratch on the same corpus for the same budget. Both run in this process, back to back, with
the same training settings (the defaults). Printed: the validation loss curves (nats per character
over the same validation characters) against seconds, and the share of each run spent sampling.

    python bench/finetune.py --base /tmp/base --seconds 60                 # generated English text
    python bench/finetune.py --base /tmp/base --seconds 60 --corpus python  # a slice of the stdlib's source

The English corpus is generated here from a small grammar (a few hundred KB, fixed seed); the
Python corpus is the standard library's ``*.py`` files, read where this interpreter keeps them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

from textrnn.checkpoint import read_metrics  # noqa: E402
from textrnn.config import ModelConfig, TrainConfig  # noqa: E402
from textrnn.training import train  # noqa: E402

SUBJECTS = ("the engineer", "my neighbour", "a tired courier", "the old baker", "our teacher", "the pilot",
            "a young doctor", "the mayor", "her brother", "the gardener", "a stranger", "the committee")
VERBS = ("repaired", "painted", "delivered", "forgot", "borrowed", "described", "sold", "found", "measured",
         "carried", "opened", "ordered")
OBJECTS = ("the broken radio", "a red bicycle", "twelve boxes of apples", "the train timetable", "an old map",
           "the kitchen window", "a letter from Paris", "the quarterly report", "a basket of bread",
           "the garden gate", "two tickets", "the spare key")
PLACES = ("at the station", "near the river", "in the library", "behind the market", "on the third floor",
          "at the harbour", "in a small village", "outside the bank")
TIMES = ("on Monday morning", "after lunch", "before the storm", "late last night", "in early spring",
         "during the meeting", "at half past nine", "every other week")
LINKS = ("because", "although", "while", "so", "but", "and then")
QUESTIONS = ("Did anyone see it happen?", "Why would they do that?", "Who paid for it?",
             "Was it really necessary?", "How long did it take?")


def english_corpus(chars: int, seed: int = 0) -> str:
    """Varied English sentences from a small grammar, in paragraphs, about ``chars`` characters."""
    rng = random.Random(seed)

    def clause() -> str:
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(PLACES))
        if rng.random() < 0.5:
            parts.append(rng.choice(TIMES))
        return " ".join(parts)

    paragraphs, size = [], 0
    while size < chars:
        sentences = []
        for _ in range(rng.randint(2, 6)):
            text = clause()
            if rng.random() < 0.4:
                text += f" {rng.choice(LINKS)} {clause()}"
            sentences.append(text[0].upper() + text[1:] + rng.choice(".....!"))
            if rng.random() < 0.15:
                sentences.append(rng.choice(QUESTIONS))
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 1
    return "\n".join(paragraphs)[:chars] + "\n"


def python_corpus(chars: int) -> str:
    """The standard library's modules, in name order, until ``chars`` characters."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= chars:
            break
    return "".join(parts)[:chars]


def run(corpus: Path, out: Path, seconds: float, threads: int, base: Path | None, model: ModelConfig | None) -> dict:
    """One budgeted run; its eval rows (seconds, step, val loss) and the seconds it spent sampling."""
    result = train([corpus], out, model, TrainConfig(max_time=seconds, threads=threads), init_from=base)
    state = json.loads((out / "last" / "state.json").read_text())
    rows = [(r["elapsed"], r["step"], r["val_loss"]) for r in read_metrics(out) if r["kind"] == "eval"]
    return {"rows": rows, "final": result.final_val_loss, "elapsed": result.elapsed, "steps": result.step,
            "sample_seconds": state.get("sample_seconds", 0.0), "samples": len(read_metrics(out, "samples.jsonl"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the run to fine-tune from")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget of each run")
    parser.add_argument("--corpus", choices=("english", "python"), default="english")
    parser.add_argument("--kb", type=int, default=300, help="size of the new corpus")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both runs (the same for both, "
                                                               "whatever the load of the machine at each start)")
    args = parser.parse_args()
    print(machine())
    base_model = ModelConfig.from_dict(json.loads((args.base / "config.json").read_text())["model"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / f"{args.corpus}.txt"
        text = english_corpus(args.kb * 1000) if args.corpus == "english" else python_corpus(args.kb * 1000)
        corpus.write_text(text, encoding="utf-8")
        print(f"new corpus: {args.corpus}, {len(text):,} characters; base {args.base} "
              f"({base_model.cell} {base_model.num_layers}x{base_model.hidden_size}); {args.seconds:g} s each, "
              f"{args.threads} thread(s)")
        # a few steps first: one-time costs (imports, kernels built on first use) are paid here, not
        # by whichever run comes first
        train([corpus], Path(tmp) / "warm-up", base_model, TrainConfig(max_steps=2, sample_length=8,
                                                                        threads=args.threads))
        runs = {"fine-tuned": run(corpus, Path(tmp) / "tuned", args.seconds, args.threads, args.base, None),
                "from scratch": run(corpus, Path(tmp) / "scratch", args.seconds, args.threads, None, base_model)}
    print(f"\n{'eval':>4}  {'fine-tuned: s':>13} {'step':>5} {'val loss':>8}   {'from scratch: s':>15} {'step':>5} "
          f"{'val loss':>8}")
    tuned, scratch = runs["fine-tuned"]["rows"], runs["from scratch"]["rows"]
    for index in range(max(len(tuned), len(scratch))):
        cells = []
        for rows, width in ((tuned, 13), (scratch, 15)):
            cells.append(f"{rows[index][0]:>{width}.1f} {rows[index][1]:>5} {rows[index][2]:>8.4f}"
                         if index < len(rows) else " " * (width + 15))
        print(f"{index + 1:>4}  {cells[0]}   {cells[1]}")
    for name, result in runs.items():
        print(f"{name}: final val loss {result['final']:.4f} nats/char after {result['steps']} steps in "
              f"{result['elapsed']:.1f} s; {result['samples']} samples took {result['sample_seconds']:.2f} s "
              f"({100 * result['sample_seconds'] / result['elapsed']:.2f}% of the run)")


if __name__ == "__main__":
    main()
