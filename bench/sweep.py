"""Presets sweep: which preset, cell and precision give the lowest val loss at a time budget?

Each configuration trains on tiny Shakespeare (90/10 split, char level) for the budget, one after
another in this process, and the final val loss (nats/char over the whole val split) is tabled.
bf16 rows run only where ``--precision auto`` would pick bf16 (AMX/AVX512-BF16 CPUs, CUDA).

    python bench/sweep.py --minutes 2 --presets small --cells gru lstm rnn
    python bench/sweep.py --minutes 10 --presets small --cells lstm rnn
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from bench.quality import CORPUS, RESULTS, run_textrnn  # noqa: E402
from textrnn.data import preprocess  # noqa: E402
from textrnn.runtime import resolve_device, resolve_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.0])
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"])
    parser.add_argument("--data", type=Path, default=CORPUS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    precisions = ["fp32"]
    if resolve_precision("auto", resolve_device("auto")) == "bf16":
        precisions.append("bf16")
    print(f"machine: {machine()}; precisions: {', '.join(precisions)} (bf16 only where the hardware has it)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = preprocess([args.data], Path(tmp) / "data", val_fraction=0.1)
        for minutes in args.minutes:
            for name in args.presets:
                for cell in args.cells:
                    for precision in precisions:
                        start = time.perf_counter()
                        curve = run_textrnn(data_dir, minutes, model_overrides={"preset": name, "cell": cell},
                                            train_overrides={"precision": precision}, log=lambda _: None)
                        row = {"minutes": minutes, "preset": name, "cell": cell, "precision": precision,
                               "val_loss": curve[-1]["val_loss"], "best": min(r["val_loss"] for r in curve),
                               "steps": curve[-1]["step"], "chars_per_sec": curve[-1]["chars_per_sec"],
                               "wall": time.perf_counter() - start}
                        rows.append(row)
                        print(f"| {minutes:g} | {name} | {cell} | {precision} | {row['val_loss']:.4f} | "
                              f"{row['steps']} | {row['chars_per_sec']:,.0f} |", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"sweep-{stamp}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print("\n| minutes | preset | cell | precision | val loss | steps | chars/s |\n|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["minutes"], r["val_loss"])):
        print(f"| {row['minutes']:g} | {row['preset']} | {row['cell']} | {row['precision']} | {row['val_loss']:.4f} "
              f"| {row['steps']} | {row['chars_per_sec']:,.0f} |")


if __name__ == "__main__":
    main()
