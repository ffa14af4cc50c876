"""The training loop: truncated BPTT, AdamW with warmup and cosine decay, clipping, evaluation,
atomic checkpoints, exact resume, signals and DDP.

``train`` reads top to bottom: set up (run directory, data, model, optimizer, maybe resume),
then the loop (batch, forward, loss, backward, clip, step, log, evaluate, save). Nothing here
prints; messages go to the ``log`` callback and the progress bar to stderr.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import ModelConfig, TrainConfig, format_duration
from .data import Dataset, TrainStreams, is_dataset_dir, load_dataset, preprocess
from .errors import CheckpointError, ConfigError, InputError, TextRNNError, TrainingError
from .evaluation import evaluate_ids, summarize
from .model import RNNLanguageModel, State, detach_state
from .runtime import autocast, resolve_device, resolve_precision, set_seed

DEFAULT_MAX_TIME = 600.0  # seconds, when no stopping rule is given
DIVERGED_FACTOR = 3.0  # a loss above this many times ln(vocab) counts as a bad step


class Interrupted(TextRNNError):
    """Training stopped by SIGINT/SIGTERM after saving ``last/``; exit 130."""

    exit_code = 130


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    best_val_bpc: float
    elapsed: float
    stop_reason: str


# ---------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # train() made the process group, so it destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """A process group when torchrun's variables are set; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()  # a caller's own group is used and left alone
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world_size, owns_group), device


def _reduce_step(bad: bool, loss: float, dist_info: _Dist, device: torch.device) -> tuple[bool, float]:
    """Whether any rank had a bad step (so all skip it), and the loss averaged over the ranks' streams
    (this rank's own loss after a bad step): one all-reduce."""
    if not dist_info.enabled:
        return bad, loss
    import torch.distributed as dist

    value = torch.tensor([1.0 if bad else 0.0, 0.0 if bad else loss], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    if value[0] > 0:
        return True, loss
    return False, float(value[1]) / dist_info.world_size


def _agree(elapsed: float, flag: bool, dist_info: _Dist, device: torch.device) -> tuple[float, bool]:
    """The largest elapsed time of all ranks, and whether ``flag`` is true on any rank (one all-reduce)."""
    if not dist_info.enabled:
        return elapsed, flag
    import torch.distributed as dist

    value = torch.tensor([elapsed, 1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0]), bool(value[1] > 0)


def _barrier(dist_info: _Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _broadcast(value, dist_info: _Dist):
    """Rank 0's value of a small JSON-like object, on every rank (an exception travels as a message)."""
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- signals

class _StopSignal:
    """First SIGINT/SIGTERM asks for a stop at the next step boundary; a second exits at once.

    ``repeat_grace`` seconds after the first, a second signal is taken as the same request: under
    torchrun a scheduler (``scancel``) signals the workers and torchrun forwards its own copy too.
    """

    def __init__(self, repeat_grace: float = 0.0) -> None:
        self.received: str | None = None
        self.repeat_grace = repeat_grace
        self._first_at = 0.0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self._first_at >= self.repeat_grace:
                os._exit(130)  # the last complete checkpoint stays intact: writes are atomic
            return
        self.received = signal.Signals(signum).name
        self._first_at = time.monotonic()

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- schedule

WARMUP_BUDGET_FRACTION = 0.05  # warmup never takes more than this share of the budget


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio.

    ``progress`` in [0, 1] is how far the run is through its budget (steps, epochs or time).
    Warmup ends after ``warmup_steps`` or 5% of the budget, whichever comes first, so that a big
    model on a short time budget does not spend its whole run warming up.
    """
    progress = min(max(progress, 0.0), 1.0)
    if config.warmup_steps:
        warm = max((step + 1) / config.warmup_steps, progress / WARMUP_BUDGET_FRACTION)
        if warm < 1.0:
            return config.lr * warm
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def _progress(config: TrainConfig, step: int, elapsed: float, steps_per_epoch: int) -> float:
    """Fraction of the budget used: the largest of the steps, epochs and time fractions."""
    fractions = [0.0]
    if config.max_steps:
        fractions.append(step / config.max_steps)
    if config.epochs:
        fractions.append(step / (config.epochs * steps_per_epoch))
    if config.max_time:
        fractions.append(elapsed / config.max_time)
    return max(fractions)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per token. (Tests replace this to inject faults.)"""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- setup helpers

def _default_run_dir(inputs: list[Path]) -> Path:
    stem = inputs[0].stem if inputs else "run"
    return Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _data_fingerprint(dataset: Dataset) -> dict[str, str]:
    from .datasets import file_sha256

    fingerprint = {}
    for name in ("train", "val"):
        path = dataset.path / f"{name}.bin"
        try:
            fingerprint[name] = file_sha256(path)
        except OSError as exc:  # deleted or moved since preprocessing
            raise CheckpointError(f"{path}: cannot read the training data ({exc.strerror}); "
                                  f"it is needed to resume") from None
    return fingerprint


def _optimizer(model: torch.nn.Module, config: TrainConfig, fused_ok: bool) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embedding" in n]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused_ok:
        # one kernel per tensor instead of about ten. On a CPU each kernel is a parallel region whose threads
        # must meet: for the 2x512 model on 2 threads the step took 3 ms fused against 8 ms unfused in a quiet
        # moment, and 10 ms against 70-500 ms while other processes kept the cores busy
        try:
            return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99), fused=True)
        except RuntimeError:  # torch < 2.4 has no fused CPU kernel
            pass
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], path: Path) -> None:
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


def _what_is_kept(run_dir: Path) -> str:
    """The end of a failure message: the checkpoint a failed run leaves, if it saved one yet."""
    if any((run_dir / name / ckpt.STATE_FILE).is_file() for name in (ckpt.LAST_DIR, ckpt.LAST_DIR + ".old")):
        return f"the last good checkpoint in {run_dir} is kept"
    return f"no checkpoint had been saved in {run_dir} yet"


def _check_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- the run

def train(inputs: list[str | os.PathLike] | None = None, out_dir: str | os.PathLike | None = None,
          model_config: ModelConfig | None = None, train_config: TrainConfig | None = None, *,
          resume: str | os.PathLike | None = None, resume_overrides: dict | None = None,
          tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
          errors: str = "strict", progress: bool = False, log: Callable[[str], None] = lambda _: None,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train a model and write its run directory; or continue one with ``resume=RUN_DIR``.

    ``inputs`` is text files, a directory of them, or one directory made by ``preprocess``.
    ``resume_overrides`` changes stopping rules of a resumed run (max_steps, max_time, epochs,
    eval_every). ``should_stop(step)`` lets a caller stop at a step boundary, as a signal would.
    """
    if resume:
        device_name = (resume_overrides or {}).get("device") or ckpt.run_config(Path(resume))["train"].get("device", "auto")
    else:
        device_name = (train_config or TrainConfig()).device
    dist_info, device = _init_distributed(device_name)
    try:
        return _train(dist_info, device, inputs, out_dir, model_config, train_config, resume, resume_overrides or {},
                      tokenizer, vocab_size, val_fraction, errors, progress, log, should_stop)
    except BaseException as exc:
        if dist_info.owns_group:  # the traceback would keep the DDP wrapper alive past its group: see below
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            # DDP must die before its process group: a gloo group whose last owner is DDP's reducer is
            # destroyed holding the GIL, and deadlocks with gloo threads still freeing tensors (torch bug)
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()


def _setup_new(dist_info, inputs, out_dir, model_config, train_config, tokenizer, vocab_size, val_fraction,
               errors, progress, log) -> tuple[Path, dict]:
    """Rank 0 creates the run directory (preprocessing raw text into it) and writes config.json."""
    if not inputs:
        raise InputError("no training input given")
    paths = [Path(p) for p in inputs]
    run_dir = Path(out_dir) if out_dir else _default_run_dir(paths)
    if (run_dir / ckpt.CONFIG_FILE).exists():
        raise InputError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a directory")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{run_dir}: cannot create the run directory ({exc.strerror})") from None
    if not os.access(run_dir, os.W_OK):
        raise InputError(f"{run_dir}: output directory is not writable")
    try:
        if len(paths) == 1 and is_dataset_dir(paths[0]):
            data_dir = paths[0].resolve()
        else:
            data_dir = (run_dir / "data").resolve()
            preprocess(paths, data_dir, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                       errors=errors, progress=progress, warn=log)
        dataset = load_dataset(data_dir)
        _check_enough_data(dataset, train_config, dist_info.world_size)  # before config.json makes this a run
        model_config.vocab_size = dataset.tokenizer.vocab_size
        dataset.tokenizer.save(run_dir)
        config = {
            "format": ckpt.RUN_FORMAT, "version": ckpt.FORMAT_VERSION,
            "model": model_config.to_dict(), "train": train_config.to_dict(),
            "tokenizer": dataset.tokenizer.to_dict(),
            "data": {"path": _data_path_for_config(data_dir, run_dir), "sha256": _data_fingerprint(dataset),
                     "chars_per_token": {s: dataset.chars_per_token(s) for s in ("train", "val")}},
            "world_size": dist_info.world_size, "torch": torch.__version__,
        }
        ckpt.write_json(run_dir / ckpt.CONFIG_FILE, config)
    except BaseException:
        if created:  # a run that cannot start leaves nothing behind (not even the preprocessed data)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, config


def _data_path_for_config(data_dir: Path, run_dir: Path) -> str:
    """``data`` for data preprocessed into the run (so the run can move); else an absolute path."""
    try:
        return str(data_dir.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(data_dir.resolve())


def _check_enough_data(dataset: Dataset, config: TrainConfig, world_size: int) -> None:
    """Refuse data too short for one training batch, or without a validation split (as ``_train`` would)."""
    TrainStreams(dataset.split("train"), config.seq_len, config.batch_size, config.seed,
                 total_streams=config.batch_size * world_size)
    val_tokens = dataset.meta["splits"]["val"]["tokens"]
    if val_tokens < 2:
        raise InputError(f"{dataset.path}: the validation split has {val_tokens} tokens; raise --val-fraction")


def _setup_resume(run_dir: Path, overrides: dict) -> dict:
    config = ckpt.run_config(run_dir)
    train_dict = {**config["train"], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        TrainConfig.from_dict(train_dict, source=str(run_dir / ckpt.CONFIG_FILE))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    config["train"] = train_dict
    return config


def _train(dist_info, device, inputs, out_dir, model_config, train_config, resume, overrides, tokenizer,
           vocab_size, val_fraction, errors, progress, log, should_stop) -> TrainResult:
    log = log if dist_info.is_main else (lambda _: None)
    progress = progress and dist_info.is_main

    # ---- run directory and config (rank 0 writes; every rank reads the same config)
    if resume:
        run_dir = Path(resume)
        config = _setup_resume(run_dir, overrides)
    else:
        model_config = model_config or ModelConfig()
        train_config = train_config or TrainConfig()
        resolve_precision(train_config.precision, device)  # fail before a half-made run directory blocks --out
        if not (train_config.max_steps or train_config.max_time or train_config.epochs):
            train_config.max_time = DEFAULT_MAX_TIME
            log(f"no stopping rule given: training for {format_duration(DEFAULT_MAX_TIME)} "
                f"(set --max-time, --max-steps or --epochs)")
        setup = None
        if dist_info.is_main:
            try:
                setup = _setup_new(dist_info, inputs, out_dir, model_config, train_config, tokenizer, vocab_size,
                                   val_fraction, errors, progress, log)
                setup = (str(setup[0]), setup[1])
            except BaseException as exc:  # whatever failed, release the other ranks waiting in the broadcast
                if dist_info.enabled:
                    _broadcast({"error": str(exc) or type(exc).__name__}, dist_info)
                raise
        setup = _broadcast(setup, dist_info)
        if isinstance(setup, dict):
            raise InputError(setup["error"])
        run_dir, config = Path(setup[0]), setup[1]
    model_config = ModelConfig.from_dict(config["model"])
    train_config = TrainConfig.from_dict(config["train"])
    data_path = run_dir / config["data"]["path"]  # relative to the run, or absolute
    dataset = load_dataset(data_path) if data_path.is_dir() else None
    if dataset is None:
        raise CheckpointError(f"{run_dir}: training data {config['data']['path']} is missing")
    if resume:  # every rank checks its own copy, so all raise together (none waits in a collective)
        current = _data_fingerprint(dataset)
        for split, digest in config["data"]["sha256"].items():
            if current.get(split) != digest:
                raise CheckpointError(f"{dataset.path / (split + '.bin')}: changed since the run started "
                                      f"(sha256 mismatch); resume needs the original data")
    precision = resolve_precision(train_config.precision, device)

    # ---- data: this rank's block of the world_size x batch_size streams
    train_ids, val_ids = dataset.split("train"), dataset.split("val")
    batch = train_config.batch_size
    streams = TrainStreams(train_ids, train_config.seq_len, batch, train_config.seed,
                           total_streams=batch * dist_info.world_size, first=batch * dist_info.rank)
    if len(val_ids) < 2:
        raise InputError(f"{dataset.path}: the validation split has {len(val_ids)} tokens; raise --val-fraction")
    chars_per_token = config["data"]["chars_per_token"]
    vocab = model_config.vocab_size

    # ---- model and optimizer
    set_seed(train_config.seed)
    model = RNNLanguageModel(model_config).to(device)
    if dist_info.enabled:  # the same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(train_config.seed + 7919 * dist_info.rank)
    optimizer = _optimizer(model, train_config, fused_ok=device.type in ("cuda", "cpu"))
    state: dict = {"step": 0, "epoch": 0, "step_in_epoch": 0, "elapsed": 0.0, "best_val_loss": None,
                   "best_val_bpc": None, "bad_steps": 0, "world_size": dist_info.world_size}
    hidden: State | None = None
    if resume:
        state, hidden = _restore(run_dir, model, optimizer, dist_info, device, log)
        ckpt.remove_stale_temporaries(run_dir) if dist_info.is_main else None
        if dist_info.is_main:
            ckpt.truncate_metrics(run_dir, state["step"])
            ckpt.write_json(run_dir / ckpt.CONFIG_FILE, config)  # keep new limits for the next resume
    train_model: torch.nn.Module = model
    if train_config.compile:
        train_model = torch.compile(model)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None)
    if hidden is None:
        hidden = model.init_state(batch, device)

    # as many eval streams as train streams over all ranks, so N ranks x B report what 1 x N*B would
    eval_streams = train_config.eval_batches or batch * dist_info.world_size

    def evaluate() -> tuple[float, float]:
        loss_sum, count = evaluate_ids(model, val_ids, seq_len=train_config.seq_len,
                                       streams=eval_streams, device=device, precision=precision,
                                       rank=dist_info.rank, world_size=dist_info.world_size)
        result = summarize(loss_sum, count, chars_per_token["val"])
        return result.loss, result.bpc

    def save_last() -> None:
        if not _check_finite(model):
            raise TrainingError(f"{run_dir}: weights hold NaN or inf; not saving them (the last good checkpoint "
                                f"is kept)")
        every_stream = _gather_hidden(hidden, dist_info)  # collectives: all ranks take part
        rng = _gather_rng(dist_info, device)
        if dist_info.is_main:
            _save_last(run_dir, model, optimizer, state, every_stream, rng, dist_info)

    # ---- the loop
    if dist_info.is_main:
        log(f"run {run_dir}: {model_config.cell} {model_config.num_layers}x{model_config.hidden_size}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, {device.type} {precision}, "
            f"effective batch {batch * dist_info.world_size} x {train_config.seq_len}"
            + (f" over {dist_info.world_size} processes" if dist_info.enabled else ""))
    tokens_per_step = batch * train_config.seq_len * dist_info.world_size
    start_time = time.perf_counter() - state["elapsed"]
    last_log_time, last_log_step = time.perf_counter(), state["step"]
    # losses since the last train row; kept in state.json so a resumed run logs the same rows
    loss_window: list[float] = state.setdefault("loss_window", [])
    consecutive_bad = 0
    stop_reason = ""
    bar = _progress_bar(progress, train_config, state["step"], streams.steps_per_epoch)
    last_val_bpc = state["best_val_bpc"]
    diverged_loss = DIVERGED_FACTOR * math.log(max(vocab, 2))
    model.train()
    with _StopSignal(repeat_grace=2.0 if dist_info.enabled else 0.0) as signals:
        try:
            while True:
                interrupt = signals.received or (should_stop and should_stop(state["step"]) and "stop requested")
                # every rank must see the same clock (max_time, cosine progress) and take the same branch
                elapsed, interrupted = _agree(time.perf_counter() - start_time, bool(interrupt), dist_info, device)
                stop_reason = _stop_reason(train_config, state, elapsed, streams.steps_per_epoch)
                if stop_reason or interrupted:  # a stopping rule wins over an interruption, as without DDP
                    stop_reason = stop_reason or f"interrupted ({interrupt or 'another rank'})"
                    break
                if state["step_in_epoch"] >= streams.steps_per_epoch:  # new epoch: fresh state, new offset
                    state["epoch"] += 1
                    state["step_in_epoch"] = 0
                    hidden = model.init_state(batch, device)
                lr = learning_rate(train_config, state["step"],
                                   _progress(train_config, state["step"], elapsed, streams.steps_per_epoch))
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # batch, forward, loss, backward, clip, step
                x, y = streams.window(state["epoch"], state["step_in_epoch"])
                x_t = torch.from_numpy(x).to(device, non_blocking=True)  # (B, L)
                y_t = torch.from_numpy(y).to(device, non_blocking=True)  # (B, L)
                with autocast(device, precision):
                    logits, new_hidden = train_model(x_t, hidden)  # (B, L, V)
                loss = _loss(logits, y_t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip or float("inf"))
                loss_value, norm_value = float(loss.detach()), float(grad_norm)
                bad = not (math.isfinite(loss_value) and math.isfinite(norm_value)) or loss_value > diverged_loss
                bad, loss_value = _reduce_step(bad, loss_value, dist_info, device)  # the same on every rank
                if bad:
                    consecutive_bad += 1
                    state["bad_steps"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    hidden = model.init_state(batch, device)  # a poisoned state must not carry on
                    log(f"step {state['step']}: skipped a bad step (loss {loss_value:.4g}, grad norm "
                        f"{norm_value:.4g}); {consecutive_bad} in a row")
                    if consecutive_bad >= train_config.max_bad_steps:
                        raise TrainingError(
                            f"training diverged: {consecutive_bad} bad steps in a row at step {state['step']} "
                            f"(non-finite or exploding loss); {_what_is_kept(run_dir)}; "
                            f"try a lower --lr or a tighter --clip")
                else:
                    optimizer.step()
                    consecutive_bad = 0
                    hidden = detach_state(new_hidden)
                    loss_window.append(loss_value)
                state["step"] += 1
                state["step_in_epoch"] += 1
                state["elapsed"] = time.perf_counter() - start_time
                step = state["step"]

                if step % train_config.log_every == 0 and loss_window:
                    now = time.perf_counter()
                    rate = (step - last_log_step) * tokens_per_step * chars_per_token["train"] / (now - last_log_time)
                    if dist_info.is_main:
                        ckpt.append_metrics(run_dir, {"kind": "train", "step": step,
                                                      "loss": float(np.mean(loss_window)), "lr": lr,
                                                      "grad_norm": norm_value, "chars_per_sec": rate,
                                                      "elapsed": state["elapsed"]})
                    _bar_update(bar, step, float(np.mean(loss_window)), last_val_bpc, rate, train_config, state)
                    loss_window.clear()  # on every rank, so that no rank's window grows without end
                    last_log_time, last_log_step = now, step
                elif bar is not None:
                    bar.update(step - bar.n)

                if consecutive_bad:
                    continue  # never evaluate or save in the middle of a bad streak
                if step % train_config.eval_every == 0:
                    last_val_bpc = _evaluate_and_save(evaluate, run_dir, model, state, dist_info, log)
                    save_last()
                elif train_config.checkpoint_every and step % train_config.checkpoint_every == 0:
                    save_last()
        finally:
            if bar is not None:
                bar.close()

        # ---- the end: interrupted runs save and say how to resume; finished runs evaluate first
        state["elapsed"] = time.perf_counter() - start_time
        if stop_reason.startswith("interrupted"):
            save_last()
            _plot(run_dir, dist_info, log)
            _barrier(dist_info)  # torchrun stops every rank when one exits: none may leave before rank 0 saved
            raise Interrupted(f"training interrupted at step {state['step']}; saved {run_dir}/{ckpt.LAST_DIR}; "
                              f"continue with: textrnn train --resume {run_dir}")
        if state["step"] % train_config.eval_every != 0 or state["best_val_loss"] is None:
            last_val_bpc = _evaluate_and_save(evaluate, run_dir, model, state, dist_info, log)
            save_last()
    _plot(run_dir, dist_info, log)
    return TrainResult(run_dir, state["step"], state["best_val_loss"], state["best_val_bpc"], state["elapsed"],
                       stop_reason)


def _stop_reason(config: TrainConfig, state: dict, elapsed: float, steps_per_epoch: int) -> str:
    if config.max_steps and state["step"] >= config.max_steps:
        return f"reached max_steps {config.max_steps}"
    if config.epochs and state["step"] >= config.epochs * steps_per_epoch:
        return f"finished {config.epochs:g} epoch(s)"
    if config.max_time and elapsed >= config.max_time:
        return f"reached max_time {format_duration(config.max_time)}"
    return ""


def _evaluate_and_save(evaluate, run_dir: Path, model, state: dict, dist_info: _Dist, log) -> float:
    """Evaluate; keep the weights if they are the best so far; log an eval row."""
    val_loss, val_bpc = evaluate()
    if not math.isfinite(val_loss):
        raise TrainingError(f"validation loss is {val_loss} at step {state['step']}; training diverged; "
                            f"{_what_is_kept(run_dir)}")
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
        state["best_val_loss"], state["best_val_bpc"] = val_loss, val_bpc
        if dist_info.is_main:
            ckpt.save_tensors(run_dir / ckpt.WEIGHTS_FILE, ckpt.model_tensors(model),
                              metadata={"step": str(state["step"]), "val_loss": repr(val_loss)})
    if dist_info.is_main:
        ckpt.append_metrics(run_dir, {"kind": "eval", "step": state["step"], "val_loss": val_loss,
                                      "val_bpc": val_bpc, "elapsed": state["elapsed"]})
        log(f"step {state['step']}: val loss {val_loss:.4f} nats/token, {val_bpc:.4f} bpc")
    return val_bpc


def _gather_hidden(hidden: State, dist_info: _Dist) -> State:
    """The hidden state of every rank's streams, concatenated along the batch in rank order."""
    if not dist_info.enabled:
        return hidden
    import torch.distributed as dist

    gathered = []
    for h in hidden:
        parts = [torch.empty_like(h) for _ in range(dist_info.world_size)]
        dist.all_gather(parts, h.contiguous())
        gathered.append(torch.cat(parts, dim=1))
    return tuple(gathered)


def _gather_rng(dist_info: _Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (dropout masks differ per rank), as ``rng.torch[.RANK]`` tensors."""
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    if not dist_info.enabled:
        return states
    import torch.distributed as dist

    gathered = {}
    for name, value in states.items():
        value = value.to(device)  # nccl gathers device tensors only
        parts = [torch.empty_like(value) for _ in range(dist_info.world_size)]
        dist.all_gather(parts, value)
        gathered.update({f"{name}.{rank}": part.cpu() for rank, part in enumerate(parts)})
    return gathered


def _save_last(run_dir: Path, model, optimizer, state: dict, hidden: State, rng: dict[str, torch.Tensor],
               dist_info: _Dist) -> None:
    tensors = {f"hidden.{i}": h for i, h in enumerate(hidden)}
    tensors.update(rng)
    with ckpt.staging_directory(run_dir / ckpt.LAST_DIR) as tmp:
        (tmp / ckpt.WEIGHTS_FILE).write_bytes(ckpt.tensor_bytes(ckpt.model_tensors(model)))
        (tmp / ckpt.OPTIMIZER_FILE).write_bytes(ckpt.tensor_bytes(_optimizer_tensors(optimizer)))
        (tmp / ckpt.STATE_TENSORS_FILE).write_bytes(ckpt.tensor_bytes(tensors))
        ckpt.write_json(tmp / ckpt.STATE_FILE, {"format": "textrnn-state", "version": ckpt.FORMAT_VERSION,
                                                **state, "world_size": dist_info.world_size})


def _restore(run_dir: Path, model, optimizer, dist_info: _Dist, device, log) -> tuple[dict, State | None]:
    """Model, optimizer, counters, hidden state and RNG from ``last/``."""
    last = ckpt.last_dir(run_dir)
    state = ckpt.read_json(last / ckpt.STATE_FILE, "checkpoint")
    ckpt.check_format(state, "textrnn-state", last / ckpt.STATE_FILE)
    for key in ("step", "epoch", "step_in_epoch", "elapsed", "bad_steps", "world_size"):
        if not isinstance(state.get(key), (int, float)) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{last / ckpt.STATE_FILE}: missing or invalid {key!r}")
    ckpt.load_weights(model, last / ckpt.WEIGHTS_FILE)
    _load_optimizer(optimizer, ckpt.load_tensors(last / ckpt.OPTIMIZER_FILE), last / ckpt.OPTIMIZER_FILE)
    tensors = ckpt.load_tensors(last / ckpt.STATE_TENSORS_FILE)
    hidden = None
    if state["world_size"] == dist_info.world_size:
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
        log(f"warning: resuming a run saved with {state['world_size']} process(es) on {dist_info.world_size}; "
            f"the data position restarts at the next epoch, so the run is not bit-exact")
        state["epoch"] += 1
        state["step_in_epoch"] = 0
    mine = f".{dist_info.rank}" if dist_info.enabled and state["world_size"] == dist_info.world_size else ""
    for name, setter in (("rng.torch", torch.set_rng_state),
                         ("rng.cuda", lambda t: torch.cuda.set_rng_state(t, device))):
        value = tensors.get(name + mine, tensors.get(name, tensors.get(name + ".0")))
        if value is None or (name == "rng.cuda" and device.type != "cuda"):
            continue
        try:
            setter(value.to(torch.uint8))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{last / ckpt.STATE_TENSORS_FILE}: invalid {name} state ({exc})") from None
    state["world_size"] = dist_info.world_size
    return state, hidden


# ---------------------------------------------------------------- progress and plot

def _progress_bar(enabled: bool, config: TrainConfig, step: int, steps_per_epoch: int):
    if not enabled:
        return None
    from tqdm import tqdm

    totals = [t for t in (config.max_steps, config.epochs and int(config.epochs * steps_per_epoch)) if t]
    total = min(totals) if totals else None
    return tqdm(total=total, initial=step, desc="training", unit="step", dynamic_ncols=True, leave=False)


def _bar_update(bar, step: int, loss: float, val_bpc: float | None, rate: float, config: TrainConfig,
                state: dict) -> None:
    if bar is None:
        return
    bar.update(step - bar.n)
    postfix = {"loss": f"{loss:.3f}", "val_bpc": f"{val_bpc:.3f}" if val_bpc else "-", "chars/s": f"{rate:,.0f}"}
    if config.max_time:
        postfix["time_left"] = format_duration(max(0.0, config.max_time - state["elapsed"]))
    bar.set_postfix(postfix, refresh=False)


def _plot(run_dir: Path, dist_info: _Dist, log) -> None:
    if dist_info.is_main:
        plot_losses(run_dir, log)


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
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    ckpt.atomic_write_bytes(run_dir / ckpt.PLOT_FILE, buffer.getvalue())
    return run_dir / ckpt.PLOT_FILE
