"""The run's state: ``RunState`` (the counters, the plan and the best score, kept in
``last/state.json``), and ``last/`` as a whole: model, optimizer, stream states and RNG, saved
together and restored exactly; and the O(1) fingerprint that ties a run to its training data.

The layout of the run directory lives in ``checkpoint.py``; the loop that uses this, in ``training.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .averaging import WeightAverage
from .distributed import Dist
from .model import State
from .errors import CheckpointError

@dataclass
class RunState:
    """What a run has done and plans to do; ``last/state.json`` holds these fields, one key each.

    The loop (``training.py``) moves the counters, ``budget.py`` writes the plan and its costs, and
    the evaluation keeps the best score. A state.json without some field (an older run) reads as
    the default here.
    """

    # progress
    step: int = 0  # optimizer steps taken, counted from the run's start
    epoch: int = 0  # passes over the training streams begun
    step_in_epoch: int = 0  # the next window of every stream
    elapsed: float = 0.0  # training seconds of all sessions, as a time budget counts them
    bad_steps: int = 0  # steps skipped for a non-finite or exploding loss
    world_size: int = 1  # processes that trained (DDP)
    threads: int | None = None  # CPU threads, kept so that a resumed run computes the same numbers
    status: str = "training"  # training, finished or interrupted
    stop_reason: str = ""  # why it stopped, once it did
    loss_window: list[float] = field(default_factory=list)  # losses since the last train row
    # the plan (budget.make_plan and replan)
    plan: int | None = None  # planned steps: the schedule decays over these
    plan_cap: int | None = None  # the bound of --max-steps or --epochs on any replanning
    plan_reason: str = ""  # the stop reason when the plan is done
    limits: dict | None = None  # the stopping rules the plan was made for; new ones make a new plan
    costs: dict | None = None  # schedule.Costs measured for a time budget
    eval_every: int | None = None  # steps between evaluations
    next_eval: int | None = None  # the step of the next evaluation
    eval_tokens: int | None = None  # validation tokens a periodic evaluation reads (None: all)
    evaluations_planned: int | None = None
    evaluations_done: int = 0
    # every plan the run followed: {"step", "plan", "eval_every", "reason"}, the first made at the
    # start (or on a resume with new limits), the others by replan; ``train --replay`` follows them
    plans: list[dict] = field(default_factory=list)
    # scores
    best_val_loss: float | None = None  # of the weights in model.safetensors
    best_val_bpc: float | None = None
    last_val_loss: float | None = None  # the latest evaluation
    last_eval_step: int | None = None
    complete_eval_step: int | None = None  # when the whole validation split was last scored
    sample_seconds: float = 0.0  # spent sampling into samples.jsonl

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, path: Path) -> "RunState":
        """Read state.json's fields; the counters a resume needs must be numbers."""
        for key in ("step", "epoch", "step_in_epoch", "elapsed", "bad_steps", "world_size"):
            if not isinstance(data.get(key), (int, float)) or isinstance(data.get(key), bool):
                raise CheckpointError(f"{path}: missing or invalid {key!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


FINGERPRINT_BLOCKS = 16  # blocks read from a data file for its fingerprint, whatever its size
FINGERPRINT_BLOCK_BYTES = 1 << 16


def data_fingerprint(path: Path) -> str:
    """The size of a file and the sha256 of 16 blocks spread over it: O(1) in the file's size.

    It catches a replaced, truncated or regenerated corpus at start and resume without reading
    tens of GB; ``textrnn info --verify`` checks the full sha256 kept in meta.json.
    """
    try:
        size = os.path.getsize(path)
        hasher = hashlib.sha256(str(size).encode())
        with open(path, "rb") as handle:
            for index in range(FINGERPRINT_BLOCKS):
                handle.seek(max(0, size - FINGERPRINT_BLOCK_BYTES) * index // (FINGERPRINT_BLOCKS - 1))
                hasher.update(handle.read(FINGERPRINT_BLOCK_BYTES))
    except OSError as exc:  # deleted or moved since preprocessing
        raise CheckpointError(f"{path}: cannot read the training data ({exc.strerror}); it is needed to resume") from None
    return f"{size}:{hasher.hexdigest()}"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        state.setdefault(int(index), {})[key] = value
    params = [p for group in state_dict["param_groups"] for p in group["params"]]
    if set(state) - set(params):
        raise CheckpointError(f"{path}: optimizer state does not match the model")
    state_dict["state"] = state
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not match the model ({exc})") from None


def save_last(run_dir: Path, model, optimizer, state: RunState, hidden: State, rng: dict[str, torch.Tensor],
              dist_info: Dist, average: WeightAverage | None = None) -> None:
    """Replace ``last/`` as a whole: weights (and their average), optimizer, stream states, RNG and
    ``state.json``."""
    tensors = {f"hidden.{i}": h for i, h in enumerate(hidden)}
    tensors.update(rng)
    with ckpt.staging_directory(run_dir / ckpt.LAST_DIR) as tmp:
        (tmp / ckpt.WEIGHTS_FILE).write_bytes(ckpt.tensor_bytes(ckpt.model_tensors(model)))
        if average is not None:
            (tmp / ckpt.AVERAGE_FILE).write_bytes(ckpt.tensor_bytes(average.tensors()))
        (tmp / ckpt.OPTIMIZER_FILE).write_bytes(ckpt.tensor_bytes(optimizer_tensors(optimizer)))
        (tmp / ckpt.STATE_TENSORS_FILE).write_bytes(ckpt.tensor_bytes(tensors))
        ckpt.write_json(tmp / ckpt.STATE_FILE, {"format": "textrnn-state", "version": ckpt.FORMAT_VERSION,
                                                **state.to_dict(), "world_size": dist_info.world_size})


def restore(run_dir: Path, model, optimizer, dist_info: Dist, device, log,
            average: WeightAverage | None = None) -> tuple[RunState, State | None]:
    """Model (and its weight average), optimizer, counters, hidden state and RNG from ``last/``."""
    last = ckpt.last_dir(run_dir)
    saved = ckpt.read_json(last / ckpt.STATE_FILE, "checkpoint")
    ckpt.check_format(saved, "textrnn-state", last / ckpt.STATE_FILE)
    state = RunState.from_dict(saved, last / ckpt.STATE_FILE)
    ckpt.load_weights(model, last / ckpt.WEIGHTS_FILE)
    load_optimizer(optimizer, ckpt.load_tensors(last / ckpt.OPTIMIZER_FILE), last / ckpt.OPTIMIZER_FILE)
    if average is not None:
        average.load(ckpt.load_tensors(last / ckpt.AVERAGE_FILE), last / ckpt.AVERAGE_FILE)
    tensors = ckpt.load_tensors(last / ckpt.STATE_TENSORS_FILE)
    hidden = None
    if state.world_size == dist_info.world_size:
        parts = [tensors[k] for k in sorted(k for k in tensors if k.startswith("hidden."))]
        expected = model.init_state(1)
        if len(parts) != len(expected) or any(p.shape[0] != e.shape[0] or p.shape[2] != e.shape[2]
                                              for p, e in zip(parts, expected)):
            raise CheckpointError(f"{last / ckpt.STATE_TENSORS_FILE}: hidden state does not match the model")
        share = parts[0].shape[1] // dist_info.world_size  # saved: every rank's streams, in rank order
        hidden = tuple(p[:, dist_info.rank * share:(dist_info.rank + 1) * share].contiguous().to(device)
                       for p in parts)
    else:
        # a different world size cuts the streams differently: re-derive the position at an epoch boundary
        log(f"warning: resuming a run saved with {state.world_size} process(es) on {dist_info.world_size}; "
            f"the data position restarts at the next epoch, so the run is not bit-exact")
        state.epoch += 1
        state.step_in_epoch = 0
    mine = f".{dist_info.rank}" if dist_info.enabled and state.world_size == dist_info.world_size else ""
    for name, setter in (("rng.torch", torch.set_rng_state),
                         ("rng.cuda", lambda t: torch.cuda.set_rng_state(t, device))):
        value = tensors.get(name + mine, tensors.get(name, tensors.get(name + ".0")))
        if value is None or (name == "rng.cuda" and device.type != "cuda"):
            continue
        try:
            setter(value.to(torch.uint8))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{last / ckpt.STATE_TENSORS_FILE}: invalid {name} state ({exc})") from None
    state.world_size = dist_info.world_size
    return state, hidden
