"""Where and how tensors run: the one device resolver, precision choice and seeding helper.

Shared by training, sampling and evaluation so that ``--device`` and ``--precision`` mean the
same thing everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import random

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
