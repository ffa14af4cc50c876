"""Dynamic evaluation: its settings chosen on training text, then its gain and cost on held-out text.

For each trained run (for example ``textrnn train data/tinyshakespeare.txt --max-time 5m --threads 1
--out /tmp/dyn-runs/shakespeare``), in one process at one thread:

1. ``--tune``: a grid of (segment length, lr, decay) scored on the last ``--tune-tokens`` tokens of
   the run's training split, never on held-out text; the best setting per run, and the one whose
   smallest share of a run's best gain is largest.
2. Held out: the first ``--eval-chars`` characters of the run's validation split, written to a file
   and scored by ``textrnn evaluate RUN FILE --dynamic`` (its own process, timed end to end), and
   by the library with 1-stream static scoring beside it (the state-reset share of the gain).
   Also: the dynamic loss with the model's own samples for gradient statistics (a run without data/).
3. ``generate --adapt``: on two halves of a held-out document, the second half's loss after the
   first has primed the state (static weights), and after it has adapted the weights too.

    python bench/dynamic_eval.py /tmp/dyn-runs/shakespeare /tmp/dyn-runs/python --tune
    python bench/dynamic_eval.py RUN... --tune --no-held-out --tune-tokens 100000 --seq-lens 20 \
        --lrs 3e-4 1e-3 3e-3 --decays 0 0.0005 0.002 0.01
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import machine  # noqa: E402

from textrnn.checkpoint import Run, load_run  # noqa: E402
from textrnn.data import load_dataset  # noqa: E402
from textrnn.dynamic import Adapter, DynamicConfig, gradient_statistics  # noqa: E402
from textrnn.evaluation import evaluate_ids  # noqa: E402

LRS = (3e-5, 1e-4, 3e-4, 1e-3)
DECAYS = (0.0, 0.002, 0.01, 0.05)
SEQ_LENS = (10, 20, 50)


def split_ids(run, name: str) -> np.ndarray:
    return load_dataset(run.path / run.config["data"]["path"]).split(name)


def static_one_stream(run, ids: np.ndarray, seq_len: int, mask: np.ndarray | None = None) -> float:
    """Per-token loss of ``ids`` read as one stream with the trained weights (no adaptation)."""
    loss, count = evaluate_ids(run.model, ids, seq_len=seq_len, streams=1, device=run.device, mask=mask)
    return loss / count


def tune(run, tokens: int, statistics_tokens: int, grid: dict, log) -> list[dict]:
    """Every grid setting's loss on the last ``tokens`` of the training split, with its static loss."""
    ids = np.asarray(split_ids(run, "train")[-tokens:], dtype=np.int64)
    rows = []
    for seq_len in grid["seq_lens"]:
        base = DynamicConfig(seq_len=seq_len, statistics_tokens=statistics_tokens)
        statistics = gradient_statistics(run, base)
        static = static_one_stream(run, ids, seq_len)
        for lr, decay in itertools.product(grid["lrs"], grid["decays"]):
            config = DynamicConfig(lr=lr, decay=decay, seq_len=seq_len, statistics_tokens=statistics_tokens)
            started = time.perf_counter()
            loss, count = Adapter(run.model, statistics, config).read(ids)
            rows.append({"seq_len": seq_len, "lr": lr, "decay": decay, "static": static, "loss": loss / count,
                         "seconds": time.perf_counter() - started})
            log(f"  seq_len {seq_len:3d} lr {lr:<6g} decay {decay:<6g}: {loss / count:.4f} (static {static:.4f}, "
                f"{rows[-1]['seconds']:.1f} s)")
    return rows


def evaluate_cli(run_dir: Path, file: Path, config: DynamicConfig) -> tuple[str, float]:
    """``textrnn evaluate RUN FILE --dynamic`` in its own process: its output and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "textrnn", "evaluate", str(run_dir), str(file), "--dynamic",
               "--lr", str(config.lr), "--decay", str(config.decay), "--seq-len", str(config.seq_len)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip(), time.perf_counter() - started


def adapt_gain(run, ids: np.ndarray, config: DynamicConfig, statistics) -> tuple[float, float]:
    """Loss of the second half of ``ids`` after the first half: primed only, and primed and adapted."""
    half = len(ids) // 2
    second = np.arange(len(ids)) >= half  # targets of the second half only (a target at i is ids[i])
    primed = static_one_stream(run, ids, config.seq_len, mask=second)
    adapter = Adapter(run.model, statistics, config)
    adapter.read(ids[:half])
    adapted = adapter.model.eval()
    loss, count = evaluate_ids(adapted, ids, seq_len=config.seq_len, streams=1, device=run.device, mask=second)
    return primed, loss / count


def held_out(run, run_dir: Path, config: DynamicConfig, chars: int, tmp: Path, log) -> dict:
    val = np.asarray(split_ids(run, "val"), dtype=np.int64)
    text = run.tokenizer.decode(val.tolist())[:chars]
    file = tmp / f"{run_dir.name}-val.txt"
    file.write_text(text, encoding="utf-8")
    output, wall = evaluate_cli(run_dir, file, config)
    log(output)
    ids = run.tokenizer.encode_array(text)
    one_stream = static_one_stream(run, ids, config.seq_len)
    primed, adapted = adapt_gain(run, ids[:20_000], config, gradient_statistics(run, config))
    with warnings.catch_warnings():  # the note that the model's samples stand in for the training split
        warnings.simplefilter("ignore")
        alone = Run(None, run.config, run.model, run.tokenizer, run.device)  # as a run dir copied without data/
        loss, count = Adapter(run.model, gradient_statistics(alone, config), config).read(ids)
    return {"output": output, "wall": wall, "one_stream": one_stream, "primed": primed, "adapted": adapted,
            "tokens": len(ids), "sampled_statistics": loss / count}


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["loss"] - r["static"])


def joint_choice(grids: dict) -> tuple[tuple, float]:
    """The setting whose smallest share of a run's best gain (over all runs) is largest, and that share."""
    def share(key: tuple) -> float:
        shares = []
        for rows in grids.values():
            top = best(rows)
            row = next(r for r in rows if (r["seq_len"], r["lr"], r["decay"]) == key)
            shares.append((row["static"] - row["loss"]) / (top["static"] - top["loss"]))
        return min(shares)

    keys = [(r["seq_len"], r["lr"], r["decay"]) for r in next(iter(grids.values()))]
    choice = max(keys, key=share)
    return choice, share(choice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="Trained run directories (with their data/).")
    parser.add_argument("--tune", action="store_true", help="Run the grid on the training split first.")
    parser.add_argument("--tune-tokens", type=int, default=20_000)
    parser.add_argument("--statistics-tokens", type=int, default=DynamicConfig().statistics_tokens)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--decays", type=float, nargs="+", default=list(DECAYS))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(SEQ_LENS))
    parser.add_argument("--eval-chars", type=int, default=100_000)
    parser.add_argument("--no-held-out", dest="held_out", action="store_false",
                        help="Only tune (the held-out part uses the library's defaults).")
    args = parser.parse_args()
    grid = {"lrs": args.lrs, "decays": args.decays, "seq_lens": args.seq_lens}
    torch.set_num_threads(1)
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"# {machine()}")
    runs = {path: load_run(path, "cpu") for path in args.runs}
    grids = {}
    if args.tune:
        for path, run in runs.items():
            log(f"tuning on the last {args.tune_tokens:,} tokens of {path}'s training split")
            grids[path] = tune(run, args.tune_tokens, args.statistics_tokens, grid, log)
            choice = best(grids[path])
            log(f"best for {path.name}: seq_len {choice['seq_len']}, lr {choice['lr']}, decay {choice['decay']}: "
                f"{choice['loss']:.4f} (static {choice['static']:.4f})")
        (seq_len, lr, decay), share = joint_choice(grids)
        log(f"over all runs: seq_len {seq_len}, lr {lr}, decay {decay} has at least {share:.1%} of each run's "
            f"best gain")
    if not args.held_out:
        return
    config = DynamicConfig(statistics_tokens=args.statistics_tokens)
    log(f"held out, with the defaults: lr {config.lr}, decay {config.decay}, seq_len {config.seq_len}")
    with tempfile.TemporaryDirectory() as tmp:
        for path, run in runs.items():
            result = held_out(run, path, config, args.eval_chars, Path(tmp), log)
            log(f"{path.name}: static 1-stream {result['one_stream']:.4f}; whole run {result['wall']:.1f} s for "
                f"{result['tokens']:,} tokens; dynamic with the model's samples for statistics "
                f"{result['sampled_statistics']:.4f}; adapt: second half primed {result['primed']:.4f}, primed "
                f"and adapted {result['adapted']:.4f}")


if __name__ == "__main__":
    main()
