"""Quality at equal CPU time: textrnn's default against a small GPT baseline on tiny Shakespeare.

Both train on the same 90/10 character split under the same wall-clock budget, back to back in
one process, and report validation loss (nats/char over the whole val split) against minutes.
textrnn's clock is the trainer's own ``--max-time`` wall clock, evaluations included; the
baseline's clock pauses while it evaluates, which favours the baseline slightly.

    python bench/quality.py --minutes 10            # table + bench/results/quality.png
    python bench/quality.py --minutes 2 --no-baseline --preset small --cell gru
    python bench/quality.py --set dropout=0.1 --baseline-from bench/results/quality-STAMP.json

``--baseline-from`` takes the baseline's curve from an earlier result file (same machine, same
budget) instead of training it again: 10 minutes saved per textrnn setting tried.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
BASELINE = "GPT baseline 0.8M"


def run_textrnn(data_dir: Path, minutes: float, model_overrides: dict | None = None,
                train_overrides: dict | None = None, log=print) -> list[dict]:
    """Train textrnn's defaults (with overrides) under a ``minutes`` budget; val loss rows against minutes.

    The trainer plans its own steps and its 10+ evaluations inside the budget; the rows are its
    eval rows (the last one over the whole validation split).
    """
    model_overrides = dict(model_overrides or {})
    name = model_overrides.pop("preset", DEFAULT_PRESET)
    model_config = preset(name, **model_overrides)
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(**{**(train_overrides or {}), "max_time": minutes * 60})
        result = train([data_dir], Path(tmp) / "run", model_config, config, log=log)
        metrics = read_metrics(result.run_dir)
        rows = [{"minutes": r["elapsed"] / 60, "step": r["step"], "val_loss": r["val_loss"]}
                for r in metrics if r["kind"] == "eval"]
        speed = [r["chars_per_sec"] for r in metrics if r["kind"] == "train"]
    for row in rows:
        row["chars_per_sec"] = sum(speed) / max(len(speed), 1)
    return rows


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rows in curves.items():
        ax.plot([r["minutes"] for r in rows], [r["val_loss"] for r in rows], "o-", label=label)
    ax.axhline(1.45, color="grey", linestyle="--", linewidth=1, label="goal 1.45")
    ax.set_xlabel("training wall-clock minutes")
    ax.set_ylabel("val loss (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--data", type=Path, default=CORPUS)
    parser.add_argument("--no-baseline", action="store_true", help="textrnn only")
    parser.add_argument("--baseline-from", type=Path, metavar="JSON",
                        help="reuse the baseline curve of an earlier result file of the same budget")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--cell", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ModelConfig or TrainConfig field, e.g. --set dropout=0.1 --set lr=2e-3")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for textrnn and the baseline (default: the trainer's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_overrides: dict = {"preset": args.preset}
    train_overrides: dict = {"threads": args.threads} if args.threads else {}
    if args.cell:
        model_overrides["cell"] = args.cell
    model_fields = set(preset(args.preset).to_dict())
    for item in args.set:
        key, _, value = item.partition("=")
        parsed = json.loads(value) if value not in ("", None) else value
        (model_overrides if key in model_fields else train_overrides)[key] = parsed

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"corpus: {args.data} ({args.data.stat().st_size:,} bytes), budget {args.minutes:g} min each")
    curves: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = preprocess([args.data], Path(tmp) / "data", val_fraction=0.1)
        label = "textrnn " + " ".join(f"{k}={v}" for k, v in {**model_overrides, **train_overrides}.items())
        curves[label] = run_textrnn(data_dir, args.minutes, model_overrides=model_overrides,
                                    train_overrides=train_overrides, log=lambda m: print("  " + m, flush=True))
    if args.baseline_from:
        earlier = json.loads(args.baseline_from.read_text(encoding="utf-8"))
        if earlier["minutes"] != args.minutes or BASELINE not in earlier["curves"]:
            sys.exit(f"{args.baseline_from}: no {args.minutes:g}-minute baseline curve in it")
        curves[BASELINE] = earlier["curves"][BASELINE]
        print(f"baseline curve from {args.baseline_from} ({earlier['machine']})")
    elif not args.no_baseline:
        from bench.baselines.gpt import train_baseline

        text = args.data.read_text(encoding="utf-8")
        curves[BASELINE] = train_baseline(text, minutes=args.minutes, eval_every_seconds=args.minutes * 10,
                                                     log=lambda m: print("  " + m, flush=True))

    print(f"\n| model | val loss at end (nats/char) | bpc | best | steps | minutes |")
    print("|---|---|---|---|---|---|")
    for label, rows in curves.items():
        end, best = rows[-1], min(r["val_loss"] for r in rows)
        print(f"| {label} | {end['val_loss']:.4f} | {end['val_loss'] / 0.6931472:.3f} | {best:.4f} | {end['step']} "
              f"| {end['minutes']:.2f} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "minutes": args.minutes, "command": " ".join(sys.argv[1:]), "curves": curves}
    (RESULTS / f"quality-{stamp}.json").write_text(json.dumps(record, indent=1))
    if BASELINE in curves:
        plot(curves, RESULTS / "quality.png", f"tiny Shakespeare, {args.minutes:g} min on {torch.get_num_threads()} "
                                              f"CPU threads")
        print(f"plot: {RESULTS / 'quality.png'}")


if __name__ == "__main__":
    main()
