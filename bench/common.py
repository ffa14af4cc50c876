"""What every benchmark prints about the machine it ran on."""

from __future__ import annotations

import torch


def machine() -> str:
    """CPU model, torch threads and torch version, for the first line of a benchmark's output."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
