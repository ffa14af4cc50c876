"""Regularisation against corpus size: the default and a grid around it, at step budgets equal to minutes.

Each cell is a corpus kind, a size and a budget. A corpus of size N is the first N characters of:

- ``shakespeare``: tiny Shakespeare (``../shared/data/tinyshakespeare.txt``, 1,115,394 characters);
- ``python``: the Python standard library's top-level modules, as ``bench/quality.py --corpus python``;
- ``gnu``: the GNU manuals in ``/usr/share/info`` (coreutils, grep, sed, gnupg, wget, ...: English
  technical prose, 4.6M characters here), unzipped in memory, in name order.

The trainer splits it 90/10 (the last tenth is validation). In every cell the default (LSTM 2x256,
dropout 0.05, weight decay 0.1, 32 streams x 64, lr 5e-3 cosine) trains beside the settings of
``SETTINGS``, one at a time, and each run's planned steps and epochs, best val loss (and its step), final
val loss and final train loss go to ``bench/results/corpus-sizes.jsonl``, one line a run.

**Budgets are step counts, not wall clock**, so that a shared machine's load does not change the
results: an M-minute budget is the steps the default reached in M minutes of ``--max-time`` on this
Intel CPU with 2 threads, unloaded (``bench/results/quality-20261202-012838.json``: 1,718 steps in 2
minutes, 8,569 in 10; 857 a minute otherwise). A setting of another shape gets those steps times its
speed relative to the default (``SPEED``), measured back to back in one process, 2 threads, by
``--calibrate``, which writes ``bench/results/corpus-sizes-speed.json``: so a 2x384 trains the steps it
would have had in M minutes. Every run then has ``max_steps`` and nothing timed, and any thread count
or load gives the same plan (the grid ran with ``--threads 1``, two processes side by side).

    python bench/corpus_sizes.py --calibrate                       # the speed ratios (a minute)
    nice -n 10 python bench/corpus_sizes.py --minutes 2 --threads 1 &   # two processes share the queue
    nice -n 10 python bench/corpus_sizes.py --minutes 2 --threads 1
    python bench/corpus_sizes.py --table                           # the tables, from the results so far

Runs already in the results file are skipped, so the command can be stopped and run again to finish
the grid; processes side by side take the next run no other has claimed (cells in order of size,
smallest first, or ``--cells shakespeare:100000 python:4500000``).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.quality import CORPUS, RESULTS, python_corpus  # noqa: E402

RESULTS_FILE = RESULTS / "corpus-sizes.jsonl"
SPEED_FILE = RESULTS / "corpus-sizes-speed.json"
KINDS = ("shakespeare", "python", "gnu")
SIZES = (100_000, 300_000, 1_115_394, 4_500_000)
RECORDED_STEPS = {2.0: 1718, 10.0: 8569}  # the default's steps in M minutes (quality-20261202-012838.json)
STEPS_PER_MINUTE = 857
DEFAULT = {"dropout": 0.05, "weight_drop": 0.0, "hidden_size": 256, "weight_decay": 0.1}
SETTINGS = {  # one or two changes from the default each, so that the table tells which one helps
    "default": {},
    "d0.15": {"dropout": 0.15},
    "d0.25": {"dropout": 0.25},
    "d0.35": {"dropout": 0.35},
    "d0.2+wdrop0.2": {"dropout": 0.2, "weight_drop": 0.2},
    "d0.15+wd0.3": {"dropout": 0.15, "weight_decay": 0.3},
    "h384+d0.15": {"hidden_size": 384, "dropout": 0.15},
    "d0.35+wdrop0.2": {"dropout": 0.35, "weight_drop": 0.2},  # these two for the smallest corpora
    "d0.5": {"dropout": 0.5},
}
MODEL_KEYS = ("dropout", "weight_drop", "hidden_size")


def corpus_text(kind: str) -> str:
    if kind == "shakespeare":
        return CORPUS.read_text(encoding="utf-8")
    if kind == "python":
        return python_corpus()
    if kind == "gnu":
        files = sorted(glob.glob("/usr/share/info/*.info*.gz"))
        text = "".join(gzip.open(f, "rt", encoding="utf-8", errors="replace").read() for f in files)
        return text.replace("\x00", "").replace("\x08", "")  # info's index cookies (NUL, backspace) are not text
    raise SystemExit(f"--kinds: unknown corpus kind {kind!r}; choose from {', '.join(KINDS)}")


def shape(setting: dict) -> str:
    """What sets a setting's speed: its hidden size and whether it drops weights."""
    full = {**DEFAULT, **setting}
    return f"h{full['hidden_size']}" + ("+wdrop" if full["weight_drop"] else "")


def measured_speed() -> dict[str, float]:
    """Each shape's steps per second relative to the default's (``--calibrate``); empty before it ran."""
    return json.loads(SPEED_FILE.read_text(encoding="utf-8"))["speed"] if SPEED_FILE.exists() else {}


def budget_steps(minutes: float, setting: dict, speed: dict[str, float]) -> int:
    """The steps of an M-minute budget for a setting: the default's recorded steps x its relative speed."""
    default_steps = RECORDED_STEPS.get(float(minutes), round(STEPS_PER_MINUTE * minutes))
    return max(1, round(default_steps * speed.get(shape(setting), 1.0)))


def run_key(kind: str, size: int, minutes: float, name: str) -> str:
    return f"{kind}/{size}/{minutes:g}/{name}"


def train_one(text: str, setting: dict, max_steps: int | None, threads: int, max_time: float | None = None,
              eval_every: int | None = None) -> dict:
    """Train the default with ``setting`` on ``text``; the plan and the losses of the run."""
    from textrnn.checkpoint import read_metrics
    from textrnn.config import TrainConfig, preset
    from textrnn.data import load_dataset, preprocess
    from textrnn.training import train

    full = {**DEFAULT, **setting}
    model_config = preset("small", **{k: full[k] for k in MODEL_KEYS})
    config = TrainConfig(max_steps=max_steps, max_time=max_time, weight_decay=full["weight_decay"], threads=threads,
                         sample_length=0, eval_every=eval_every)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "corpus.txt").write_text(text, encoding="utf-8")
        data_dir = preprocess([Path(tmp) / "corpus.txt"], Path(tmp) / "data", val_fraction=0.1)
        train_tokens = load_dataset(data_dir).meta["splits"]["train"]["tokens"]
        start = time.perf_counter()
        result = train([data_dir], Path(tmp) / "run", model_config, config)
        wall = time.perf_counter() - start
        metrics = read_metrics(result.run_dir)
    evals = [r for r in metrics if r["kind"] == "eval"]
    trains = [r for r in metrics if r["kind"] == "train"]
    best = min(evals, key=lambda r: r["val_loss"])
    steps = evals[-1]["step"]
    return {"train_tokens": train_tokens, "planned_steps": steps,
            "planned_epochs": steps * config.batch_size * config.seq_len / train_tokens,
            "best_val_loss": best["val_loss"], "best_step": best["step"], "final_val_loss": evals[-1]["val_loss"],
            "final_train_loss": statistics.mean(r["loss"] for r in trains[-5:]),
            "curve": [(r["step"], round(r["val_loss"], 4)) for r in evals],
            "chars_per_sec": statistics.median(r["chars_per_sec"] for r in trains[2:] or trains), "wall": wall}


def calibrate(threads: int, rounds: int = 3, steps: int = 200) -> dict[str, float]:
    """Steps per second of each shape relative to the default's, in one process, shapes interleaved."""
    torch.set_num_threads(threads)
    text = CORPUS.read_text(encoding="utf-8")[:300_000]
    shapes = {shape(s): s for s in SETTINGS.values()}
    ratios: dict[str, list[float]] = {name: [] for name in shapes}
    for index in range(rounds):
        rates = {name: train_one(text, s, steps, threads, eval_every=steps)["chars_per_sec"] for name, s in shapes.items()}
        for name, rate in rates.items():
            ratios[name].append(rate / rates[shape({})])
        print(f"round {index + 1}: " + ", ".join(f"{n} {r:,.0f} chars/s" for n, r in rates.items()), flush=True)
    speed = {name: round(statistics.median(values), 3) for name, values in ratios.items()}
    SPEED_FILE.write_text(json.dumps({"machine": machine(), "threads": threads, "steps": steps, "rounds": rounds,
                                      "speed": speed, "ratios": ratios}, indent=1) + "\n", encoding="utf-8")
    print(f"speed relative to the default: {speed} -> {SPEED_FILE}")
    return speed


def done_runs() -> dict[str, dict]:
    if not RESULTS_FILE.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def cells(args) -> list[tuple[str, int]]:
    """The (kind, size) cells to run, in order: ``--cells``, else by size (smallest first), then kind."""
    if args.cells:
        pairs = [c.partition(":") for c in args.cells]
        if bad := [k for k, _, _ in pairs if k not in KINDS]:
            raise SystemExit(f"--cells: unknown corpus kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
        return [(kind, int(size)) for kind, _, size in pairs]
    return [(kind, size) for size in sorted(args.sizes) for kind in args.kinds]


def queue(cell_list, budgets, names) -> list[tuple[str, int, float, str]]:
    """Every run: budgets in the given order, then the cells in theirs, then the settings."""
    return [(kind, size, minutes, name) for minutes in budgets for kind, size in cell_list for name in names]


CLAIMS = Path(tempfile.gettempdir()) / "textrnn-corpus-sizes-claims"


def claim(key: str) -> bool:
    """Take a run for this process (processes side by side share the queue); a dead process's claim is free."""
    CLAIMS.mkdir(exist_ok=True)
    path = CLAIMS / key.replace("/", "_")
    try:
        os.kill(int(path.read_text()), 0)
        return False  # its process is alive
    except (FileNotFoundError, ValueError, ProcessLookupError):
        path.unlink(missing_ok=True)
    try:
        with open(path, "x") as handle:
            handle.write(str(os.getpid()))
        return True
    except FileExistsError:
        return False


def release(key: str) -> None:
    (CLAIMS / key.replace("/", "_")).unlink(missing_ok=True)


def table(rows: list[dict]) -> str:
    """Markdown: per cell, the default's and the grid's best final val loss; then every setting's."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["minutes"], KINDS.index(r["kind"]), r["size"]), {})[r["setting"]] = r
    out = ["| corpus | size | budget | default's epochs | default: final (best at step) | grid's best final | "
           "its setting | default - best |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for (minutes, kind, size), runs in sorted(cells.items()):
        d = runs.get("default")
        best = min(runs.values(), key=lambda r: r["final_val_loss"])
        partial = "" if len(runs) == len(SETTINGS) else f" ({len(runs)} of {len(SETTINGS)})"
        out.append(f"| {KINDS[kind]} | {size:,} | {minutes:g} min | "
                   + (f"{d['planned_epochs']:.1f} | {d['final_val_loss']:.4f} ({d['best_val_loss']:.4f} at "
                      f"{d['best_step']:,} of {d['planned_steps']:,}) | " if d else "- | - | ")
                   + f"{best['final_val_loss']:.4f} | {best['setting']}{partial} | "
                   + (f"{d['final_val_loss'] - best['final_val_loss']:+.4f} |" if d else "- |"))
    for metric, title in (("final_val_loss", "final val loss"), ("best_val_loss", "best val loss (the kept weights)")):
        out += ["", f"{title}:", "", "| corpus | size | budget | " + " | ".join(SETTINGS) + " |",
                "|---|---:|---:|" + "---:|" * len(SETTINGS)]
        for (minutes, kind, size), runs in sorted(cells.items()):
            values = [f"{runs[n][metric]:.4f}" if n in runs else "-" for n in SETTINGS]
            out.append(f"| {KINDS[kind]} | {size:,} | {minutes:g} min | " + " | ".join(values) + " |")
    out += ["", "`--preset auto`'s pick (`rule_pick`): its measured final val loss against the grid's best:", "",
            "| corpus | size | budget | epochs | rule's pick | its final | grid's best | pick - best | default - best |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for (minutes, kind, size), runs in sorted(cells.items()):
        any_run = next(iter(runs.values()))
        name, _ = rule_pick(minutes, any_run["train_tokens"])
        epochs = RECORDED_STEPS.get(float(minutes), round(STEPS_PER_MINUTE * minutes)) * 2048 / any_run["train_tokens"]
        best = min(r["final_val_loss"] for r in runs.values())
        measured = runs.get(name.split(" ")[0], {}).get("final_val_loss")
        d = runs.get("default")
        out.append(f"| {KINDS[kind]} | {size:,} | {minutes:g} min | {epochs:.1f} | {name} | "
                   + (f"{measured:.4f} | {best:.4f} | {measured - best:+.4f} |" if measured else f"- | {best:.4f} | - |")
                   + (f" {d['final_val_loss'] - best:+.4f} |" if d else " - |"))
    return "\n".join(out)


def next_time_of_day(hh_mm: str) -> float:
    """The next moment the local clock reads ``hh_mm``, as a timestamp."""
    import datetime

    now = datetime.datetime.now()
    at = now.replace(hour=int(hh_mm.split(":")[0]), minute=int(hh_mm.split(":")[1]), second=0, microsecond=0)
    return (at if at > now else at + datetime.timedelta(days=1)).timestamp()


def rule_pick(minutes: float, train_tokens: int) -> tuple[str, dict]:
    """What ``--preset auto`` chooses at this budget and corpus: the width (``config.auto_shape``), then
    the dropout and weight drop from that model's planned epochs and the training tokens
    (``config.auto_regularisation``); and the grid setting that is it: the same width, dropout and weight
    drop, or the nearest dropout with the same width and weight drop (named so)."""
    from textrnn.config import TrainConfig, auto_regularisation, auto_shape

    defaults = TrainConfig()
    shape = auto_shape(minutes * 60.0, train_tokens)
    steps = budget_steps(minutes, {"hidden_size": shape["hidden_size"]}, measured_speed())
    epochs = steps * defaults.batch_size * defaults.seq_len / train_tokens
    chosen = auto_regularisation(epochs, train_tokens, floor=shape["dropout"])
    pick = {**DEFAULT, "hidden_size": shape["hidden_size"], **chosen}
    candidates = {n: {**DEFAULT, **st} for n, st in SETTINGS.items()
                  if {**DEFAULT, **st}["hidden_size"] == pick["hidden_size"]
                  and {**DEFAULT, **st}["weight_decay"] == DEFAULT["weight_decay"]
                  and {**DEFAULT, **st}["weight_drop"] == pick["weight_drop"]}
    name = min(candidates, key=lambda n: abs(candidates[n]["dropout"] - pick["dropout"]))
    if candidates[name]["dropout"] != pick["dropout"]:
        name = f"{name} (nearest to dropout {pick['dropout']:g})"
    return name, pick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.0, 10.0], help="budgets, run in this order")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="characters (capped at the corpus)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cells", nargs="+", default=None, metavar="KIND:SIZE",
                        help="these cells, in this order, instead of every kind at every size")
    parser.add_argument("--calibrate", action="store_true", help="measure the speed ratios (2 threads) and stop")
    parser.add_argument("--table", action="store_true", help="print the tables of the results so far and stop")
    parser.add_argument("--deadline", default=None, help="HH:MM: start no run after this time of day (its next one: 00:30 at 23:00 is tomorrow)")
    args = parser.parse_args()
    if args.calibrate:
        calibrate(threads=2)
        return
    if args.table:
        print(table(list(done_runs().values())))
        return
    if not SPEED_FILE.exists():
        raise SystemExit(f"{SPEED_FILE} is missing: run --calibrate first")
    speed = measured_speed()
    torch.set_num_threads(args.threads)  # what the trainer will use, for machine()
    texts = {kind: corpus_text(kind) for kind in {c[0] for c in cells(args)}}
    todo = [run for run in queue(cells(args), args.minutes, args.settings)
            if run[1] <= len(texts[run[0]])]  # a size the corpus cannot give is skipped
    print(f"machine: {machine()}; {args.threads} thread(s); speed {speed}; "
          f"{sum(run_key(*r) not in done_runs() for r in todo)} runs not done yet", flush=True)
    stop_at = next_time_of_day(args.deadline) if args.deadline else None
    for kind, size, minutes, name in todo:
        if stop_at and time.time() >= stop_at:
            print(f"deadline {args.deadline}: stopping", flush=True)
            break
        key = run_key(kind, size, minutes, name)
        if key in done_runs() or not claim(key):  # done, or another process is on it
            continue
        try:
            setting = SETTINGS[name]
            steps = budget_steps(minutes, setting, speed)
            load = os.getloadavg()[0]
            row = train_one(texts[kind][:size], setting, steps, args.threads)
            row = {"key": key, "kind": kind, "size": size, "minutes": minutes, "setting": name,
                   "settings": {**DEFAULT, **setting}, **row, "threads": args.threads, "load_at_start": round(load, 2),
                   "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
            with open(RESULTS_FILE, "a", encoding="utf-8") as handle:  # one short line, appended whole
                handle.write(json.dumps(row) + "\n")
        finally:
            release(key)
        print(f"{key}: {steps:,} steps, {row['planned_epochs']:.1f} epochs, final {row['final_val_loss']:.4f}, "
              f"best {row['best_val_loss']:.4f} at {row['best_step']:,}, train {row['final_train_loss']:.3f}, "
              f"{row['wall']:.0f} s", flush=True)
    print(table(list(done_runs().values())))


if __name__ == "__main__":
    main()
