"""loss.png: training and validation loss against step, drawn from metrics.jsonl.

matplotlib is optional (``pip install 'textrnn[plot]'``); without it the plot is skipped with a note.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ckpt


def plot_losses(run_dir: Path, log: Callable[[str], None] = lambda _: None) -> Path | None:
    """Write loss.png (train and val loss against step); skipped with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed, so no loss.png (pip install 'textrnn[plot]')")
        return None
    rows = ckpt.read_metrics(run_dir)
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train", alpha=0.7)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["val_loss"] for r in eval_rows], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    if train_rows or eval_rows:  # an empty legend is a UserWarning on stderr
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    ckpt.atomic_write_bytes(run_dir / ckpt.PLOT_FILE, buffer.getvalue())
    return run_dir / ckpt.PLOT_FILE
