"""Where and how tensors run: the one device resolver, precision choice and seeding helper.

Shared by training, sampling and evaluation so that ``--device`` and ``--precision`` mean the
same thing everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested, but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps requested, but MPS is not available")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16) that make bf16 pay."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.lru_cache(maxsize=None)
def _cpu_bf16_rnn_works() -> bool:
    """oneDNN refuses bf16 RNNs on some CPUs; try a tiny LSTM once instead of failing mid-run."""
    try:
        lstm = torch.nn.LSTM(8, 8, batch_first=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = lstm(torch.zeros(1, 2, 8))
        out.float().sum().backward()
        return True
    except RuntimeError:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA with bf16 support and on CPUs with AMX/AVX512-BF16, else fp32."""
    if precision == "fp32":
        return "fp32"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = (precision == "bf16" or cpu_has_fast_bf16()) and _cpu_bf16_rnn_works()
    else:
        supported = False
    if precision == "auto":
        return "bf16" if supported else "fp32"
    if precision == "bf16" and not supported:
        raise ConfigError(f"bf16 is not supported for recurrent layers on this {device.type} device; "
                          f"use --precision fp32")
    if precision not in ("bf16", "auto"):
        raise ConfigError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    return "bf16"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere), so a budget can count the imports too."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _busy_cores(seconds: float = 0.25) -> float | None:
    """How many cores other processes kept busy over a short look at /proc/stat (None if unknown)."""
    def sample() -> tuple[list[int], float]:
        with open("/proc/stat", encoding="ascii") as handle:
            ticks = [int(v) for v in handle.readline().split()[1:]]
        return ticks, time.process_time()

    try:
        before, own_before = sample()
        time.sleep(seconds)
        after, own_after = sample()
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0:
        return None
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    busy = (total - idle) / total * (os.cpu_count() or 1)
    own = (own_after - own_before) / seconds
    return max(0.0, busy - own)


def choose_threads(requested: int | None, look: float = 0.25) -> tuple[int, str]:
    """The intra-op thread count for training, and why.

    An explicit count wins, then ``TEXTRNN_THREADS``, then ``OMP_NUM_THREADS`` (torch already
    follows it). Otherwise: the usable cores that no other process keeps busy right now (watched
    for ``look`` seconds). Each parallel region waits for its slowest thread, so one thread
    sharing a core with a busy process slows every step; a thread fewer runs at near full speed
    instead (BENCHMARKS.md).
    """
    if requested:
        return requested, "--threads"
    env = os.environ.get("TEXTRNN_THREADS", "").strip()
    if env:
        try:
            count = int(env)
        except ValueError:
            raise ConfigError(f"TEXTRNN_THREADS must be a positive integer, got {env!r}") from None
        if count < 1:
            raise ConfigError(f"TEXTRNN_THREADS must be a positive integer, got {env!r}")
        return count, "TEXTRNN_THREADS"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = _usable_cores()
    busy = _busy_cores(look)
    if busy is None or cores == 1:
        return cores, f"{cores} cores"
    free = max(1, min(cores, round(cores - busy)))
    if free == cores:
        return cores, f"{cores} idle cores"
    return free, f"{cores} cores, {cores - free} busy at start"
