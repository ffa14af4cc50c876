"""DDP scaling: training chars/s of one process against torchrun ranks, on CPU and (when there is
one) GPU, through the real command line: ``python -m textrnn train`` and ``torchrun -m textrnn train``.

Every configuration trains the same model on the same preprocessed split with the same batch per
process, so N ranks step an effective batch N times larger (weak scaling, as DDP is used).
chars/s is what the trainer logs in metrics.jsonl: rank 0's clock over the characters of all
ranks' streams. The first train row (start-up, oneDNN/cuDNN set-up) is dropped; the table shows
the median of the others and the best (the least disturbed by other work on the machine).

CPU rows: 1 process with 1 thread, 2 gloo ranks with 1 thread each, 1 process with 2 threads (the
same cores as the two ranks). GPU rows, only where CUDA is available: 1 process on 1 GPU, and
nccl ranks over every GPU when there are several. Where there is no GPU the script says so.

    python bench/ddp_scaling.py                      # the table, as in BENCHMARKS.md
    python bench/ddp_scaling.py --steps 40 --hidden 64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _corpus(path: Path, chars: int) -> None:
    """The first ``chars`` characters of tiny Shakespeare, or a synthetic text without it."""
    if CORPUS.is_file():
        text = CORPUS.read_text(encoding="utf-8")[:chars]
    else:
        words = "the of and to a in that is was he for it with as his on be at by i".split()
        text = " ".join(words[(i * 7 + i // 13) % len(words)] for i in range(chars // 3))[:chars]
    path.write_text(text, encoding="utf-8")


def run(label: str, data_dir: Path, out: Path, args: argparse.Namespace, *, ranks: int, threads: int,
        device: str) -> dict:
    """Train one configuration in a subprocess; its chars/s rows from metrics.jsonl."""
    train_args = ["train", str(data_dir), "--out", str(out), "--device", device, "--precision", "fp32",
                  "--cell", "lstm", "--layers", str(args.layers), "--hidden", str(args.hidden),
                  "--embed", str(args.embed), "--dropout", "0", "--seq-len", str(args.seq_len),
                  "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                  "--eval-every", str(10 * args.steps)]
    if ranks == 1:
        command = [sys.executable, "-m", "textrnn", *train_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "textrnn", *train_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TEXTRNN_PROGRESS"):
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{label}: failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["chars_per_sec"] for row in rows if row.get("kind") == "train"][1:]
    if not rates:
        raise SystemExit(f"{label}: too few steps for a rate; raise --steps")
    return {"label": label, "ranks": ranks, "threads": threads, "median": statistics.median(rates),
            "best": max(rates), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per configuration (rows every 10)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--embed", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="streams per process")
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="streams per process on GPU")
    parser.add_argument("--chars", type=int, default=300_000, help="characters of corpus to use")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    args = parser.parse_args()

    import torch

    from textrnn.data import preprocess

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# DDP scaling: lstm {args.layers}x{args.hidden}, embed {args.embed}, window {args.seq_len}, "
          f"{args.steps} steps; torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _corpus(tmp_path / "corpus.txt", args.chars)
        data_dir = preprocess([tmp_path / "corpus.txt"], tmp_path / "data")
        cpu = [("CPU, 1 process x 1 thread", 1, 1), ("CPU, 2 gloo ranks x 1 thread", 2, 1),
               ("CPU, 1 process x 2 threads", 1, 2)]
        for index, (label, ranks, threads) in enumerate(cpu):
            rows.append(run(label, data_dir, tmp_path / f"cpu{index}", args, ranks=ranks, threads=threads,
                            device="cpu"))
        if torch.cuda.is_available():
            gpu_args = argparse.Namespace(**{**vars(args), "batch_size": args.gpu_batch_size})
            rows.append(run("GPU, 1 process on 1 GPU", data_dir, tmp_path / "gpu1", gpu_args, ranks=1, threads=1,
                            device="cuda"))
            gpus = torch.cuda.device_count()
            if gpus > 1:
                rows.append(run(f"GPU, {gpus} nccl ranks (1 GPU each)", data_dir, tmp_path / "gpun", gpu_args,
                                ranks=gpus, threads=1, device="cuda"))
        else:
            print("# GPU: skipped, CUDA is not available on this machine")

    base = rows[0]["median"]
    print(f"\n| configuration | batch per process | chars/s (median) | chars/s (best) | vs 1 CPU process | wall s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        batch = args.gpu_batch_size if row["label"].startswith("GPU") else args.batch_size
        print(f"| {row['label']} | {batch} | {row['median']:,.0f} | {row['best']:,.0f} | "
              f"{row['median'] / base:.2f}x | {row['wall']:.0f} |")


if __name__ == "__main__":
    main()
