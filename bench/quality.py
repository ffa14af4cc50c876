"""Quality at equal CPU time: textrnn's default against its peers, at several budgets, on one corpus.

Three systems train on the same 90/10 character split of one corpus and report validation loss
(nats/char over the whole validation split) against training minutes:

- textrnn's default (``textrnn train corpus --max-time M``, the LSTM), one run per budget. Its
  clock is the trainer's own wall clock, evaluations included.
- the GPT baseline (``bench/baselines/gpt.py``, nanoGPT's CPU recipe for shakespeare_char), one run
  per budget, as its cosine schedule is laid out over the budget;
- the char-rnn recipe (``bench/baselines/charrnn.py``, char-rnn's own defaults in plain PyTorch),
  one run of the longest budget: its schedule does not know the budget, so it is evaluated at
  each shorter budget on the way.

The baselines' clocks pause while they evaluate, which favours them slightly.

    python bench/quality.py                                   # tiny Shakespeare, 10 min, all three
    python bench/quality.py --minutes 2 10 30                 # three budgets, one figure
    python bench/quality.py --corpus python --minutes 2 10 30 # the Python standard library (4.7 MB)
    python bench/quality.py --only textrnn --set weight_drop=0.2 --minutes 10
    python bench/quality.py --only textrnn --minutes 30 --reuse bench/results/quality-STAMP.json

``--reuse`` takes every result not trained now (a system, or a budget) from earlier result files of
the same corpus and machine, the first file that has it first: trying a textrnn setting does not
train the peers again, and a 30-minute run joins the 2- and 10-minute ones in one table and figure
(``--only ''`` trains nothing and only merges). With ``--set ema=D`` the last row also holds the val
loss of the run's own final weights, so the average is measured against them in one run. The table,
a JSON record and a figure (final loss against budget, and the curves of the longest budget) go to
``bench/results/``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

from textrnn.checkpoint import read_metrics  # noqa: E402
from textrnn.config import DEFAULT_PRESET, TrainConfig, preset  # noqa: E402
from textrnn.data import preprocess  # noqa: E402
from textrnn.training import train  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("textrnn", "gpt", "charrnn")
LABELS = {"textrnn": "textrnn (default LSTM)", "gpt": "GPT baseline 0.8M (nanoGPT CPU recipe)",
          "charrnn": "char-rnn recipe (2x128 LSTM, RMSprop)"}


def python_corpus() -> str:
    """The Python standard library's top-level modules, in name order: what ``make demo`` trains on."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    return "".join(Path(f).read_text(encoding="utf-8") for f in files)


def run_textrnn(data_dir: Path, minutes: float, model_overrides: dict | None = None,
                train_overrides: dict | None = None, log=print) -> list[dict]:
    """Train textrnn's defaults (with overrides) under a ``minutes`` budget; val loss rows against minutes.

    The trainer plans its own steps and its 10+ evaluations inside the budget; the rows are its
    eval rows (the last one over the whole validation split).
    """
    model_overrides = dict(model_overrides or {})
    name = model_overrides.pop("preset", DEFAULT_PRESET)
    model_config = preset(name, minutes * 60, **model_overrides)  # "auto" sizes the model for the budget
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(**{**(train_overrides or {}), "max_time": minutes * 60})
        result = train([data_dir], Path(tmp) / "run", model_config, config, log=log)
        metrics = read_metrics(result.run_dir)
        rows = [{"minutes": r["elapsed"] / 60, "step": r["step"], "val_loss": r["val_loss"]}
                for r in metrics if r["kind"] == "eval"]
        speed = [r["chars_per_sec"] for r in metrics if r["kind"] == "train"]
        if config.ema and rows:  # the same run's own final weights, scored as its average was: the pair
            rows[-1]["raw_val_loss"] = score_raw_weights(result.run_dir, data_dir)
            log(f"val loss {rows[-1]['val_loss']:.4f} with the weight average, {rows[-1]['raw_val_loss']:.4f} "
                f"with the final weights")
    for row in rows:
        row["chars_per_sec"] = sum(speed) / max(len(speed), 1)
    return rows


def score_raw_weights(run_dir: Path, data_dir: Path) -> float:
    """Val loss (whole split) of the weights the optimizer ended with, in a run trained with ``ema``:
    they are in ``last/model.safetensors``, scored with the streams and precision of its evaluations."""
    from textrnn.checkpoint import load_run, load_weights
    from textrnn.data import load_dataset
    from textrnn.evaluation import evaluate_ids

    run = load_run(run_dir, "cpu", weights="last")
    load_weights(run.model, Path(run_dir) / "last" / "model.safetensors")
    evaluation = run.config["evaluation"]
    loss_sum, count = evaluate_ids(run.model, load_dataset(data_dir).split("val"), seq_len=run.config["train"]["seq_len"],
                                   streams=evaluation["streams"], device=torch.device("cpu"),
                                   precision=evaluation["precision"])
    return loss_sum / count


def final(rows: list[dict]) -> float:
    return rows[-1]["val_loss"]


def charrnn_at(rows: list[dict], minutes: float) -> list[dict]:
    """The char-rnn rows of a budget: up to its evaluation at that budget (its run evaluates at
    each budget on the way, as soon as the step that crosses it ends)."""
    taken = []
    for row in rows:
        taken.append(row)
        if row["minutes"] >= minutes:
            break
    return taken


def plot(runs: dict[str, dict[str, list[dict]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    budgets = sorted({float(m) for by_budget in runs.values() for m in by_budget})
    # the curves of the longest budget that every system ran (else the longest of all)
    shared = [m for m in budgets if all(by_budget.get(_key(m)) for by_budget in runs.values())]
    curves = max(shared) if shared else max(budgets)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for system, by_budget in runs.items():
        points = sorted((float(m), final(rows)) for m, rows in by_budget.items() if rows)
        left.plot([m for m, _ in points], [v for _, v in points], "o-", label=LABELS.get(system, system))
        for m, v in points:
            left.annotate(f"{v:.3f}", (m, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        rows = by_budget.get(_key(curves))
        if rows:
            right.plot([r["minutes"] for r in rows], [r["val_loss"] for r in rows], ".-",
                       label=LABELS.get(system, system))
    left.set_xscale("log")
    left.set_xticks(budgets, [f"{m:g}" for m in budgets])
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("budget (minutes of training)")
    left.set_ylabel("val loss at the end (nats/char)")
    left.set_title("after each budget")
    right.set_xlabel("training wall-clock minutes")
    right.set_ylabel("val loss (nats/char)")
    right.set_title(f"during the {curves:g}-minute runs")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _key(minutes: float) -> str:
    return f"{minutes:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0], help="budgets (default 10)")
    parser.add_argument("--corpus", default="shakespeare",
                        help="shakespeare (tiny Shakespeare), python (the standard library) or a text file")
    parser.add_argument("--only", default=",".join(SYSTEMS), help=f"systems to train now, of {', '.join(SYSTEMS)}")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="JSON",
                        help="take the results of the systems and budgets not trained now from these earlier "
                             "result files (the first file that has a system's budget gives it)")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--cell", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ModelConfig or TrainConfig field, e.g. --set dropout=0.1 --set lr=2e-3")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every system (default: the trainer's choice; torch's for the peers)")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := set(only) - set(SYSTEMS):
        sys.exit(f"--only: unknown system(s) {', '.join(sorted(unknown))}; choose from {', '.join(SYSTEMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = sorted(args.minutes)

    if args.corpus == "shakespeare":
        corpus_name, text = "tiny Shakespeare", CORPUS.read_text(encoding="utf-8")
    elif args.corpus == "python":
        corpus_name, text = "Python standard library", python_corpus()
    else:
        corpus_name, text = Path(args.corpus).name, Path(args.corpus).read_text(encoding="utf-8")

    model_overrides: dict = {"preset": args.preset}
    train_overrides: dict = {"threads": args.threads} if args.threads else {}
    if args.cell:
        model_overrides["cell"] = args.cell
    model_fields = set(preset(args.preset).to_dict())
    for item in args.set:
        key, _, value = item.partition("=")
        parsed = json.loads(value) if value not in ("", None) else value
        (model_overrides if key in model_fields else train_overrides)[key] = parsed
    settings = {k: v for k, v in {**model_overrides, **train_overrides}.items() if k != "preset" or v != DEFAULT_PRESET}

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"corpus: {corpus_name} ({len(text):,} characters); budgets {', '.join(_key(m) for m in budgets)} min; "
          f"training now: {', '.join(only)}" + (f"; textrnn settings {settings}" if settings else ""))
    runs: dict[str, dict[str, list[dict]]] = {}
    say = lambda m: print("  " + m, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.txt"
        corpus_file.write_text(text, encoding="utf-8")
        if "textrnn" in only:
            data_dir = preprocess([corpus_file], Path(tmp) / "data", val_fraction=0.1)
            runs["textrnn"] = {}
            for minutes in budgets:
                print(f"textrnn, {minutes:g} min", flush=True)
                runs["textrnn"][_key(minutes)] = run_textrnn(data_dir, minutes, model_overrides, train_overrides, say)
    if "gpt" in only:
        from bench.baselines.gpt import train_baseline

        runs["gpt"] = {}
        for minutes in budgets:
            print(f"GPT baseline, {minutes:g} min", flush=True)
            runs["gpt"][_key(minutes)] = train_baseline(text, minutes=minutes, eval_every_seconds=minutes * 10, log=say)
    if "charrnn" in only:
        from bench.baselines.charrnn import train_charrnn

        print(f"char-rnn recipe, {max(budgets):g} min, evaluated at {', '.join(_key(m) for m in budgets)}", flush=True)
        rows = train_charrnn(text, minutes=max(budgets), eval_every_seconds=max(budgets) * 6,
                             eval_at_minutes=budgets, log=say)
        runs["charrnn"] = {_key(m): charrnn_at(rows, m) for m in budgets}
    for path in args.reuse:  # every system and budget not trained now
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier.get("corpus") != corpus_name:
            sys.exit(f"{path}: results for {earlier.get('corpus')!r}, not {corpus_name!r}")
        for system, by_budget in earlier["runs"].items():
            if system == "textrnn" and earlier.get("settings", {}) != settings:
                continue  # textrnn results of other settings do not mix
            for minutes, rows in by_budget.items():
                runs.setdefault(system, {}).setdefault(minutes, rows)
        budgets = sorted({float(m) for by_budget in runs.values() for m in by_budget})
        print(f"results not trained now from {path} ({earlier['machine']}, {earlier.get('command', '')})")

    print("\n| system | " + " | ".join(f"{_key(m)} min" for m in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for system, by_budget in runs.items():
        cells = [f"{final(by_budget[_key(m)]):.4f}" if by_budget.get(_key(m)) else "-" for m in budgets]
        print(f"| {LABELS[system]} | " + " | ".join(cells) + " |")
    print("val loss in nats/char at the end of each budget, over the whole validation split")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "corpus": corpus_name, "budgets": budgets, "settings": settings,
              "command": " ".join(sys.argv[1:]), "runs": runs}
    out = RESULTS / f"quality-{stamp}.json"
    for index in range(2, 100):  # two runs side by side may end in the same second
        try:
            with open(out, "x", encoding="utf-8") as handle:
                handle.write(json.dumps(record, indent=1))
            break
        except FileExistsError:
            out = RESULTS / f"quality-{stamp}-{index}.json"
    print(f"results: {out}")
    if len(runs) > 1 and not settings:
        figure = RESULTS / f"quality-{Path(args.corpus).stem}.png"
        plot(runs, figure, f"{corpus_name}, {torch.get_num_threads()} CPU threads, {machine().split(',')[0]}")
        print(f"plot: {figure}")


if __name__ == "__main__":
    main()
