"""The run directory: one place that knows its layout, writes it atomically and reads it safely.

Tensors live in safetensors files and everything else in JSON, so loading never unpickles.
Every file is written to a temporary name in the same directory, fsynced and renamed; ``last/``
is replaced as a whole, so a crash at any moment leaves the previous complete checkpoint.
Building models and optimizers from these files is left to ``training.py`` and ``sampling.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError, write_error
from .fileio import (TMP_PREFIX, atomic_write_bytes, atomic_write_text, read_json, read_regular_file,  
                     remove_stale_temporaries, staging_directory, write_json)

RUN_FORMAT = "textrnn-run"
DATA_FORMAT = "textrnn-data"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
AVERAGE_FILE = "average.safetensors"  # in last/: the weight average (--ema), which is what last/ is loaded as
LAST_DIR = "last"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STATE_TENSORS_FILE = "state.safetensors"  # hidden state of the streams, RNG states
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # a text sampled at each evaluation; rows like metrics.jsonl's
PLOT_FILE = "loss.png"


# ---------------------------------------------------------------- tensors

def tensor_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, tensor_bytes(tensors, metadata))


def load_tensors(path: Path) -> dict:
    """Tensors from a safetensors file; anything else is a clear CheckpointError, never a pickle load."""
    from safetensors.torch import load

    path = Path(path)
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated or empty ({len(data)} bytes); not a safetensors file")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises SafetensorError, or ValueError on odd dtypes
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({reason})") from None


# ---------------------------------------------------------------- run directory

def run_config(run_dir: Path) -> dict:
    """``config.json`` of a run, checked for format and version."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: is a file, not a run directory")
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir}: not a textrnn run (no {CONFIG_FILE})")
    config = read_json(run_dir / CONFIG_FILE, "run")
    check_format(config, RUN_FORMAT, run_dir / CONFIG_FILE)
    for key in ("model", "train", "tokenizer"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{run_dir / CONFIG_FILE}: missing the {key!r} section")
    return config


def check_format(data: dict, expected: str, path: Path) -> None:
    if data.get("format") != expected:
        raise CheckpointError(f"{path}: not a {expected} file (format is {data.get('format')!r})")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this textrnn reads "
                              f"({FORMAT_VERSION}); upgrade textrnn")


def last_dir(run_dir: Path) -> Path:
    """The newest complete ``last/`` checkpoint (``last.old/`` if a crash hit between renames)."""
    run_dir = Path(run_dir)
    for name in (LAST_DIR, LAST_DIR + ".old"):
        candidate = run_dir / name
        if (candidate / STATE_FILE).is_file():
            return candidate
    raise CheckpointError(f"{run_dir}: no resumable checkpoint ({LAST_DIR}/{STATE_FILE} missing)")


def append_metrics(run_dir: Path, row: dict, name: str = METRICS_FILE) -> None:
    """Append one JSON row to ``metrics.jsonl`` (or ``name``, another such file of the run)."""
    path = Path(run_dir) / name
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    except OSError as exc:  # a full disk: a clear message, and the checkpoints already saved stay intact
        raise write_error(path, exc) from None


def read_metrics(run_dir: Path, name: str = METRICS_FILE) -> list[dict]:
    path = Path(run_dir) / name
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict) and isinstance(row.get("step", 0), (int, float)):  # not damage
                rows.append(row)
    return rows


def truncate_metrics(run_dir: Path, step: int, name: str = METRICS_FILE) -> None:
    """Drop rows logged after ``step`` (by a run killed after its last checkpoint)."""
    if not (Path(run_dir) / name).is_file():
        return
    rows = [r for r in read_metrics(run_dir, name) if r.get("step", 0) <= step]
    atomic_write_text(Path(run_dir) / name, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- loading a run

class Run:
    """A trained run, loaded: its model (eval mode, best weights), tokenizer and config."""

    def __init__(self, path: Path, config: dict, model, tokenizer, device):
        self.path, self.config, self.model, self.tokenizer, self.device = path, config, model, tokenizer, device


def load_weights(model, path: Path) -> None:
    """Load a safetensors state dict into ``model``, checking names, shapes and dtypes."""
    tensors = load_tensors(path)
    check_weights(model, tensors, path)
    model.load_state_dict(tensors, strict=False)


def check_weights(model, tensors: dict, path: Path) -> None:
    """Raise CheckpointError unless ``tensors`` fit ``model`` (which may live on the meta device)."""
    import torch

    expected = model.state_dict()
    # a tied head shares the embedding tensor; safetensors stores it once
    missing = sorted(set(expected) - set(tensors) - _tied_keys(model))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:4])}" if missing else f"unexpected {', '.join(unexpected[:4])}"
        raise CheckpointError(f"{path}: weights do not match the model in config.json ({detail})")
    for name, tensor in tensors.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{tuple(want.shape)}")
        if tensor.dtype != want.dtype:
            raise CheckpointError(f"{path}: {name} is {tensor.dtype}, expected {want.dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values")


def _tied_keys(model) -> set[str]:
    return {"head.weight"} if getattr(model.config, "tie_weights", False) else set()


def model_tensors(model) -> dict:
    """The state dict to save: a tied head weight is stored once, as the embedding."""
    state = model.state_dict()
    for key in _tied_keys(model):
        state.pop(key, None)
    return state


def weights_file(run_dir: str | os.PathLike, weights: str = "best") -> Path:
    """The weights file a run is loaded from: ``best`` (model.safetensors) or ``last`` (last/).

    A run killed before its first evaluation has no best weights yet; its latest saved ones are
    the best there are, so ``best`` falls back to them. A run trained with a weight average
    (``--ema``) is evaluated with the average, so ``last`` means the average too.
    """
    run_dir = Path(run_dir)
    if weights == "last":
        return _last_weights(last_dir(run_dir))
    best = run_dir / WEIGHTS_FILE
    if not best.exists() and (run_dir / LAST_DIR / WEIGHTS_FILE).is_file():
        return _last_weights(run_dir / LAST_DIR)
    return best


def _last_weights(last: Path) -> Path:
    return last / AVERAGE_FILE if (last / AVERAGE_FILE).is_file() else last / WEIGHTS_FILE


def write_run(directory: str | os.PathLike, model, tokenizer, train: dict | None = None) -> Path:
    """A run directory for ``model``'s weights as they are, as the trainer leaves one (config,
    tokenizer, best weights), without training: for tests, benchmarks and weights from elsewhere.
    ``directory`` must not exist. ``train`` is the config's train section (default: the defaults)."""
    from .config import TrainConfig

    directory = Path(directory)
    directory.mkdir(parents=True)
    tokenizer.save(directory)
    write_json(directory / CONFIG_FILE, {"format": RUN_FORMAT, "version": FORMAT_VERSION,
                                         "model": model.config.to_dict(),
                                         "train": TrainConfig().to_dict() if train is None else train,
                                         "tokenizer": tokenizer.to_dict()})
    save_tensors(directory / WEIGHTS_FILE, model_tensors(model))
    return directory


def load_run(run_dir: str | os.PathLike, device=None, weights: str = "best") -> Run:
    """Load a run directory for inference: config, tokenizer and weights (``best`` or ``last``)."""
    import torch

    from .config import ModelConfig
    from .errors import ConfigError
    from .model import RNNLanguageModel
    from .tokenizers import load_tokenizer

    run_dir = Path(run_dir)
    config = run_config(run_dir)
    try:
        model_config = ModelConfig.from_dict(config["model"], source=str(run_dir / CONFIG_FILE))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    tokenizer = load_tokenizer(run_dir)
    if model_config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{run_dir}: the model's vocabulary ({model_config.vocab_size}) does not match "
                              f"the tokenizer's ({tokenizer.vocab_size})")
    path = weights_file(run_dir, weights)
    if weights == "best" and path != run_dir / WEIGHTS_FILE:
        import warnings

        warnings.warn(f"{run_dir}: no evaluated weights yet; using {LAST_DIR}/ (the weights at the last save)",
                      stacklevel=2)
    tensors = load_tensors(path)
    with torch.device("meta"):  # shapes only, nothing allocated: a hostile config.json cannot exhaust memory
        check_weights(RNNLanguageModel(model_config), tensors, path)
    model = RNNLanguageModel(model_config)
    model.load_state_dict(tensors, strict=False)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device).eval()
    return Run(run_dir, config, model, tokenizer, device)
