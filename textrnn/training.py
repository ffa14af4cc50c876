"""The training loop: truncated BPTT, AdamW on a step-planned schedule, clipping, evaluation,
atomic checkpoints, exact resume, signals and DDP.

``train`` reads top to bottom: set up (run directory, data, model, optimizer, maybe resume),
plan (a time budget becomes a number of steps after a short calibration), then the loop (batch,
forward, loss, backward, clip, step, log, evaluate, save) and the end. The schedule lives in
``schedule.py``, the resume state in ``runstate.py``, collectives in ``distributed.py`` and the
plot in ``plot.py``. Nothing here prints: messages go to the ``log`` callback, the bar to stderr.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import signal
import textwrap
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
from .averaging import WeightAverage
from .config import DEFAULT_PRESET, ModelConfig, TrainConfig, format_duration, preset
from .data import Dataset, TrainStreams, is_dataset_dir, load_dataset, preprocess
from .distributed import Dist, agree, barrier, broadcast, gather_hidden, gather_rng, init_distributed, reduce_step
from .errors import CheckpointError, ConfigError, InputError, TextRNNError, TrainingError
from .evaluation import evaluate_ids, summarize
from .model import RNNLanguageModel, State, detach_state
from .plot import plot_losses
from .runstate import data_fingerprint, restore, save_last
from .runtime import autocast, choose_threads, resolve_precision, set_seed
from .budget import make_plan, measure_costs, over_budget, replan, rollback, snapshot, time_steps
from .finetune import Base, base_record, check_base_tokenizer, read_base, start_from_base
from .schedule import Costs, learning_rate
from .tokenizers import Tokenizer

DEFAULT_MAX_TIME = 600.0  # seconds, when no stopping rule is given
DIVERGED_FACTOR = 3.0  # a loss above this many times ln(vocab) counts as a bad step
PLAIN_LOG_SECONDS = 15.0  # a progress line this often when stderr is not a terminal
SAMPLE_TEMPERATURE = 0.8  # of the text sampled at each evaluation
SAMPLE_PROMPT_TOKENS = 200  # the default sample prompt is the first line of at most this much validation text
_NO_LOG: Callable[[str], None] = lambda _: None


class Interrupted(TextRNNError):
    """Training stopped by SIGINT/SIGTERM after saving ``last/``; exit 130."""

    exit_code = 130


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    best_val_bpc: float
    elapsed: float  # training time of the run, all sessions, as the budget counts it
    stop_reason: str
    plan: int = 0  # the planned number of steps
    final_val_loss: float | None = None  # complete evaluation of the final weights
    wall_time: float = 0.0  # this process, from its start to the end, preprocessing left out
    preprocess_time: float = 0.0


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


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per token. (Tests replace this to inject faults.)"""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- the run

def train(inputs: list[str | os.PathLike] | None = None, out_dir: str | os.PathLike | None = None,
          model_config: ModelConfig | None = None, train_config: TrainConfig | None = None, *,
          resume: str | os.PathLike | None = None, resume_overrides: dict | None = None,
          init_from: str | os.PathLike | None = None, tokenizer: str | None = None, vocab_size: int | None = None,
          val_fraction: float = 0.1, errors: str = "strict", progress: bool = False,
          log: Callable[[str], None] = _NO_LOG, should_stop: Callable[[int], bool] | None = None,
          started: float | None = None) -> TrainResult:
    """Train a model and write its run directory; or continue one with ``resume=RUN_DIR``.

    ``inputs`` is text files, a directory of them, or one directory made by ``preprocess``.
    ``resume_overrides`` changes what a resumed run may change (``config.RESUME_OVERRIDES``).
    ``init_from=RUN_DIR`` fine-tunes: a new run that starts from that run's best weights, model
    and tokenizer (``model_config`` may then change only its dropout and weight drop; see ``read_base``).
    ``tokenizer`` is ``char`` unless given, or the base's with ``init_from``.
    ``should_stop(step)`` lets a caller stop at a step boundary, as a signal would. ``started``
    (a ``time.perf_counter()`` value) is when the time budget began: the process's start for the
    CLI, the call otherwise.
    """
    started = time.perf_counter() if started is None else started
    overrides = resume_overrides or {}
    if resume and init_from:
        raise ConfigError("init_from starts a new run from a trained one and resume continues a run; give one")
    if resume:
        saved_train = ckpt.run_config(Path(resume))["train"]
        device_name = overrides.get("device") or saved_train.get("device", "auto")
    else:
        device_name = (train_config or TrainConfig()).device
    dist_info, device = init_distributed(device_name)
    threads_before = torch.get_num_threads()
    try:
        return _train(dist_info, device, inputs=inputs, out_dir=out_dir, model_config=model_config,
                      train_config=train_config, resume=resume, overrides=overrides, init_from=init_from,
                      data_settings=dict(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                                         errors=errors),
                      progress=progress, log=log, should_stop=should_stop, started=started)
    except BaseException as exc:
        if dist_info.owns_group:  # the traceback would keep the DDP wrapper alive past its group: see below
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        torch.set_num_threads(threads_before)
        if dist_info.owns_group:
            import torch.distributed as dist

            # DDP must die before its process group: a gloo group whose last owner is DDP's reducer is
            # destroyed holding the GIL, and deadlocks with gloo threads still freeing tensors (torch bug)
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()


def _train(dist_info: Dist, device: torch.device, *, inputs, out_dir, model_config: ModelConfig | None,
           train_config: TrainConfig | None, resume, overrides: dict, init_from, data_settings: dict, progress: bool,
           log: Callable[[str], None], should_stop, started: float) -> TrainResult:
    """``train`` on this process's rank and device: the arguments are train's, named."""
    log = log if dist_info.is_main else _NO_LOG
    progress = progress and dist_info.is_main
    # before anything is written: TEXTRNN_THREADS may be wrong, and the load is read before the work starts
    threads, threads_why = choose_threads(overrides.get("threads") if resume else (train_config or TrainConfig()).threads)

    # ---- run directory and config (rank 0 writes; every rank reads the same config)
    preprocess_time = 0.0
    if resume:
        run_dir = Path(resume)
        config = _setup_resume(run_dir, overrides)
    else:
        base = read_base(Path(init_from), model_config, data_settings) if init_from else None
        train_config = train_config or TrainConfig()
        # no model config: the default preset ("auto"), sized for the budget given
        model_config = base.model_config if base else (model_config or preset(DEFAULT_PRESET, train_config.max_time))
        resolve_precision(train_config.precision, device)  # fail before a half-made run directory blocks --out
        if not (train_config.max_steps or train_config.max_time or train_config.epochs):
            train_config.max_time = DEFAULT_MAX_TIME
            log(f"no stopping rule given: a {format_duration(DEFAULT_MAX_TIME)} budget "
                f"(set --max-time, --max-steps or --epochs)")
        setup = None
        if dist_info.is_main:
            try:
                setup = _setup_new(dist_info, inputs, out_dir, model_config, train_config, base, progress=progress,
                                   log=log, **data_settings)
                setup = (str(setup[0]), setup[1], setup[2])
            except BaseException as exc:  # whatever failed, release the other ranks waiting in the broadcast
                if dist_info.enabled:
                    broadcast({"error": str(exc) or type(exc).__name__}, dist_info)
                raise
        setup = broadcast(setup, dist_info)
        if isinstance(setup, dict):
            raise InputError(setup["error"])
        run_dir, config, preprocess_time = Path(setup[0]), setup[1], setup[2]
        if preprocess_time >= 0.5:
            log(f"preprocessed in {format_duration(preprocess_time)} (not counted in the time budget)")
    model_config = ModelConfig.from_dict(config["model"])
    train_config = TrainConfig.from_dict(config["train"])
    data_path = run_dir / config["data"]["path"]  # relative to the run, or absolute
    dataset = load_dataset(data_path) if data_path.is_dir() else None
    if dataset is None:
        raise CheckpointError(f"{run_dir}: training data {config['data']['path']} is missing")
    if resume:  # every rank checks its own copy, so all raise together (none waits in a collective)
        _check_same_data(dataset, config["data"])
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
    if not resume and config.get("init_from"):  # fine-tuning: the base's weights (a resumed run has its own)
        start_from_base(model, Path(config["init_from"]["path"]), dataset.tokenizer)
    if dist_info.enabled:  # the same initial weights everywhere, but each rank its own dropout masks
        torch.manual_seed(train_config.seed + 7919 * dist_info.rank)
    optimizer = _optimizer(model, train_config, fused_ok=device.type in ("cuda", "cpu"))
    average = WeightAverage(model, train_config.ema) if train_config.ema else None
    averaged = average.applied if average else contextlib.nullcontext  # what evaluations and saves see
    state: dict = {"step": 0, "epoch": 0, "step_in_epoch": 0, "elapsed": 0.0, "best_val_loss": None,
                   "best_val_bpc": None, "bad_steps": 0, "world_size": dist_info.world_size,
                   "last_eval_step": None, "status": "training"}
    hidden: State | None = None
    if resume:
        state, hidden = restore(run_dir, model, optimizer, dist_info, device, log, average)
        state.setdefault("last_eval_step", None)
        if dist_info.is_main:
            ckpt.remove_stale_temporaries(run_dir)
            ckpt.truncate_metrics(run_dir, state["step"])
            ckpt.truncate_metrics(run_dir, state["step"], ckpt.SAMPLES_FILE)
            ckpt.write_json(run_dir / ckpt.CONFIG_FILE, config)  # keep new limits for the next resume
        log(f"resumed from step {state['step']} ({format_duration(state['elapsed'])} trained)")
    state["status"] = "training"
    if resume and not overrides.get("threads") and state.get("threads"):
        threads, threads_why = state["threads"], "as the run started"  # the same threads give the same numbers
    if device.type == "cpu":
        torch.set_num_threads(threads)
    state["threads"] = threads
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
    # what `evaluate` needs to score as the trainer does: the streams (all ranks') and the precision
    evaluation = {"streams": eval_streams, "precision": precision}
    if dist_info.is_main and config.get("evaluation") != evaluation:  # a new run, or resumed elsewhere
        on_disk = ckpt.run_config(run_dir)  # not the in-memory config: resume overrides stay out of the file
        on_disk["evaluation"] = config["evaluation"] = evaluation
        ckpt.write_json(run_dir / ckpt.CONFIG_FILE, on_disk)

    def evaluate(tokens: int | None = None) -> tuple[float, float, int]:
        """Validation loss, bpc and tokens scored, over the first ``tokens`` tokens (all for None)."""
        ids = val_ids if tokens is None or tokens + 1 >= len(val_ids) else val_ids[:tokens + 1]
        loss_sum, count = evaluate_ids(model, ids, seq_len=train_config.seq_len, streams=eval_streams,
                                       device=device, precision=precision, rank=dist_info.rank,
                                       world_size=dist_info.world_size)
        result = summarize(loss_sum, count, chars_per_token["val"])
        return result.loss, result.bpc, count

    sample = None  # rank 0 samples a text at each evaluation, into samples.jsonl
    if train_config.sample_length:
        prompt = _sample_prompt(train_config, dataset.tokenizer, val_ids)  # every rank checks it: all raise together
        if dist_info.is_main:
            sample = _Sample(model, dataset.tokenizer, device, prompt, train_config.sample_length, train_config.seed)

    def save_last_now() -> None:
        if not _check_finite(model):
            raise TrainingError(f"{run_dir}: weights hold NaN or inf; not saving them (the last good checkpoint "
                                f"is kept)")
        every_stream = gather_hidden(hidden, dist_info)  # collectives: all ranks take part
        rng = gather_rng(dist_info, device)
        if dist_info.is_main:
            save_last(run_dir, model, optimizer, state, every_stream, rng, dist_info, average)

    def clock() -> float:
        """Training time of the run so far: earlier sessions, then this process less preprocessing."""
        return elapsed_before + time.perf_counter() - started - preprocess_time

    elapsed_before = state["elapsed"]
    diverged_loss = DIVERGED_FACTOR * math.log(max(vocab, 2))

    def train_step(lr: float) -> tuple[float, float, bool]:
        """One optimizer step on the next window of every stream: (loss, grad norm, bad).

        batch, forward, loss, backward, clip, step; a bad step (non-finite or exploding) is skipped
        on every rank and its state reset.
        """
        nonlocal hidden
        if state["step_in_epoch"] >= streams.steps_per_epoch:  # new epoch: fresh state, new offset
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            hidden = model.init_state(batch, device)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
        bad, loss_value = reduce_step(bad, loss_value, dist_info, device)  # the same on every rank
        if bad:
            optimizer.zero_grad(set_to_none=True)
            hidden = model.init_state(batch, device)  # a poisoned state must not carry on
        else:
            optimizer.step()
            if average is not None:
                average.update(state["step"])
            hidden = detach_state(new_hidden)
        state["step"] += 1
        state["step_in_epoch"] += 1
        return loss_value, norm_value, bad

    if dist_info.is_main:
        log(f"run {run_dir}: {model_config.cell} {model_config.num_layers}x{model_config.hidden_size}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, {device.type} {precision}"
            + (f", {threads} thread{'s' if threads > 1 else ''} ({threads_why})" if device.type == "cpu" else "")
            + f", effective batch {batch * dist_info.world_size} x {train_config.seq_len}"
            + (f" over {dist_info.world_size} processes" if dist_info.enabled else ""))

    with _StopSignal(repeat_grace=2.0 if dist_info.enabled else 0.0) as signals:
        # ---- the plan: steps from --max-steps/--epochs, or from a time budget after calibration
        limits = {k: getattr(train_config, k) for k in ("max_steps", "max_time", "epochs", "eval_every",
                                                         "eval_tokens")}
        if state.get("plan") is None or state.get("limits") != limits:
            costs = None
            if train_config.max_time:  # time a few real steps, then take them back
                model.train()
                saved = snapshot(model, optimizer, state, hidden)
                saved_average = average.copy() if average else None
                step_seconds = time_steps(train_step, train_config, clock, signals, dist_info, device)
                hidden = rollback(saved, model, optimizer, state)
                if average:
                    average.put_back(saved_average)
                if step_seconds is None:  # a signal came while calibrating
                    state["elapsed"] = clock()
                    return _interrupted(run_dir, evaluate, sample, save_last_now, model, state, dist_info, log,
                                        None, averaged)
                costs = measure_costs(step_seconds, evaluate, sample, save_last_now, run_dir, len(val_ids) - 1,
                                       train_config, dist_info)
            make_plan(state, train_config, costs, agree(clock(), False, dist_info, device)[0],
                       streams.steps_per_epoch, len(val_ids) - 1, limits, dist_info, log)
        plan, eval_tokens = state["plan"], state["eval_tokens"]
        costs = Costs(**state["costs"]) if state.get("costs") else None
        final_cost = costs.final(len(val_ids) - 1) if costs else 0.0

        # ---- the loop
        tokens_per_step = batch * train_config.seq_len * dist_info.world_size
        last_log_time, last_log_step, last_plain_log = time.perf_counter(), state["step"], time.perf_counter()
        # losses since the last train row; kept in state.json so a resumed run logs the same rows
        loss_window: list[float] = state.setdefault("loss_window", [])
        consecutive_bad = 0
        stop_reason = ""
        step_seconds = costs.step if costs else 0.0  # a running estimate, the same on every rank
        bar = _progress_bar(progress, plan, state["step"])
        last_val_bpc = state["best_val_bpc"]
        model.train()
        previous_elapsed = None
        interval_start = (state["step"], clock())  # (step, elapsed) after the last evaluation
        try:
            while True:
                interrupt = signals.received or (should_stop and should_stop(state["step"]) and "stop requested")
                # every rank sees the same clock and takes the same branch
                elapsed, interrupted = agree(clock(), bool(interrupt), dist_info, device)
                state["elapsed"] = elapsed
                if previous_elapsed is not None:  # an exponential average of whole steps, evaluations left out
                    step_seconds = 0.8 * step_seconds + 0.2 * (elapsed - previous_elapsed) if step_seconds else \
                        elapsed - previous_elapsed
                if state["step"] >= plan:
                    stop_reason = state["plan_reason"]
                    break
                if interrupted:
                    stop_reason = f"interrupted ({interrupt or 'another rank'})"
                    break
                if over_budget(train_config, elapsed, step_seconds, final_cost):
                    stop_reason = (f"time budget: stopped at step {state['step']} of the planned {plan}, "
                                   f"as the machine ran slower than calibrated")
                    break

                lr = learning_rate(train_config, state["step"], plan)
                loss_value, norm_value, bad = train_step(lr)
                step = state["step"]
                previous_elapsed = elapsed
                if bad:
                    consecutive_bad += 1
                    state["bad_steps"] += 1
                    log(f"step {step - 1}: skipped a bad step (loss {loss_value:.4g}, grad norm "
                        f"{norm_value:.4g}); {consecutive_bad} in a row")
                    if consecutive_bad >= train_config.max_bad_steps:
                        raise TrainingError(
                            f"training diverged: {consecutive_bad} bad steps in a row at step {step - 1} "
                            f"(non-finite or exploding loss); {_what_is_kept(run_dir)}; "
                            f"try a lower --lr or a tighter --clip")
                else:
                    consecutive_bad = 0
                    loss_window.append(loss_value)

                if step % train_config.log_every == 0 and loss_window:
                    now = time.perf_counter()
                    rate = (step - last_log_step) * tokens_per_step * chars_per_token["train"] / (now - last_log_time)
                    loss_mean = float(np.mean(loss_window))
                    if dist_info.is_main:
                        ckpt.append_metrics(run_dir, {"kind": "train", "step": step, "loss": loss_mean, "lr": lr,
                                                      "grad_norm": norm_value, "chars_per_sec": rate,
                                                      "elapsed": clock()})
                    if bar is not None:
                        _bar_update(bar, step, loss_mean, last_val_bpc, rate, train_config, clock())
                    elif now - last_plain_log >= PLAIN_LOG_SECONDS:
                        log(_progress_line(step, plan, loss_mean, last_val_bpc, rate, train_config, clock()))
                        last_plain_log = now
                    loss_window.clear()  # on every rank, so that no rank's window grows without end
                    last_log_time, last_log_step = now, step
                elif bar is not None:
                    bar.update(step - bar.n)

                if consecutive_bad:
                    continue  # never evaluate or save in the middle of a bad streak
                if step >= state["next_eval"] and step < plan:
                    state["elapsed"] = clock()
                    if train_config.max_time and step > interval_start[0]:  # the speed since the last evaluation
                        speed = (state["elapsed"] - interval_start[1]) / (step - interval_start[0])
                        plan = replan(state, train_config, costs, speed, len(val_ids) - 1, dist_info, log)
                    with averaged():
                        last_val_bpc = _evaluate_and_save(evaluate, sample, eval_tokens, run_dir, model, state,
                                                          dist_info, log)
                    state["next_eval"] = step + state["eval_every"]
                    save_last_now()
                    previous_elapsed = None  # the evaluation is not a step
                    interval_start = (step, clock())
                elif train_config.checkpoint_every and step % train_config.checkpoint_every == 0:
                    state["elapsed"] = clock()
                    save_last_now()
                    previous_elapsed = None
        finally:
            if bar is not None:
                bar.close()

        # ---- the end: interrupted runs save and say how to resume; finished runs evaluate first
        state["elapsed"] = clock()
        if stop_reason.startswith("interrupted"):
            return _interrupted(run_dir, evaluate, sample, save_last_now, model, state, dist_info, log, eval_tokens,
                                averaged)
        if state["last_eval_step"] != state["step"]:  # the same tokens as every other evaluation
            with averaged():
                last_val_bpc = _evaluate_and_save(evaluate, sample, eval_tokens, run_dir, model, state, dist_info,
                                                  log)
        if eval_tokens is not None and state.get("complete_eval_step") != state["step"]:  # then the whole split
            state["elapsed"] = clock()
            with averaged():
                full_loss, full_bpc, count = evaluate(None)
            state["complete_eval_step"] = state["step"]
            _log_eval(run_dir, state, full_loss, full_bpc, count, dist_info, log)
        state["elapsed"] = clock()
        state["status"], state["stop_reason"] = "finished", stop_reason
        save_last_now()
    if dist_info.is_main:
        plot_losses(run_dir, log)
    return TrainResult(run_dir, state["step"], state["best_val_loss"], state["best_val_bpc"], clock(), stop_reason,
                       plan, state.get("last_val_loss"), time.perf_counter() - started - preprocess_time, preprocess_time)


def _setup_new(dist_info, inputs, out_dir, model_config, train_config, base: "Base | None", tokenizer, vocab_size,
               val_fraction, errors, progress, log) -> tuple[Path, dict, float]:
    """Rank 0 creates the run directory (preprocessing raw text into it) and writes config.json;
    returns the directory, the config and the seconds spent preprocessing. A fine-tuned run
    encodes its text with the base's tokenizer and records its base in config.json."""
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
        preprocess_time = 0.0
        if len(paths) == 1 and is_dataset_dir(paths[0]):
            data_dir = paths[0].resolve()
        else:
            data_dir = (run_dir / "data").resolve()
            preprocess_start = time.perf_counter()
            preprocess(paths, data_dir, tokenizer=base.tokenizer.kind if base else tokenizer or "char",
                       vocab_size=vocab_size, val_fraction=val_fraction, errors=errors, progress=progress, warn=log,
                       start_from=base.tokenizer if base else None)
            preprocess_time = time.perf_counter() - preprocess_start
        dataset = load_dataset(data_dir)
        if base:
            check_base_tokenizer(base, dataset)
        _check_enough_data(dataset, train_config, dist_info.world_size)  # before config.json makes this a run
        if train_config.sample_length:
            _sample_prompt(train_config, dataset.tokenizer, dataset.split("val"))  # a prompt it can encode
        model_config.vocab_size = dataset.tokenizer.vocab_size
        dataset.tokenizer.save(run_dir)
        config = {
            "format": ckpt.RUN_FORMAT, "version": ckpt.FORMAT_VERSION,
            "model": model_config.to_dict(), "train": train_config.to_dict(),
            "tokenizer": dataset.tokenizer.to_dict(),
            "data": {"path": _data_path_for_config(data_dir, run_dir), "fingerprint": _fingerprints(dataset),
                     "chars_per_token": {s: dataset.chars_per_token(s) for s in ("train", "val")}},
            "world_size": dist_info.world_size, "torch": torch.__version__,
        }
        if base:
            config["init_from"] = base_record(base, dataset.tokenizer, log)
        ckpt.write_json(run_dir / ckpt.CONFIG_FILE, config)
    except BaseException:
        if created:  # a run that cannot start leaves nothing behind (not even the preprocessed data)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, config, preprocess_time


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


def _default_run_dir(inputs: list[Path]) -> Path:
    stem = inputs[0].stem if inputs else "run"
    return Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


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


def _what_is_kept(run_dir: Path) -> str:
    """The end of a failure message: the checkpoint a failed run leaves, if it saved one yet."""
    if any((run_dir / name / ckpt.STATE_FILE).is_file() for name in (ckpt.LAST_DIR, ckpt.LAST_DIR + ".old")):
        return f"the last good checkpoint in {run_dir} is kept"
    return f"no checkpoint had been saved in {run_dir} yet"


def _check_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- evaluation and the end

def _evaluate_and_save(evaluate, sample: "_Sample | None", tokens: int | None, run_dir: Path, model, state: dict,
                       dist_info: Dist, log) -> float:
    """Evaluate; keep the weights if they are the best so far; log an eval row and a sample. Returns the bpc."""
    val_loss, val_bpc, count = evaluate(tokens)
    if not math.isfinite(val_loss):
        raise TrainingError(f"validation loss is {val_loss} at step {state['step']}; training diverged; "
                            f"{_what_is_kept(run_dir)}")
    state["last_eval_step"] = state["step"]
    state["evaluations_done"] = state.get("evaluations_done", 0) + 1
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
        state["best_val_loss"], state["best_val_bpc"] = val_loss, val_bpc
        if dist_info.is_main:
            ckpt.save_tensors(run_dir / ckpt.WEIGHTS_FILE, ckpt.model_tensors(model),
                              metadata={"step": str(state["step"]), "val_loss": repr(val_loss)})
    _log_eval(run_dir, state, val_loss, val_bpc, count, dist_info, log)
    if sample is not None:
        sample.record(run_dir, state, val_loss, log)
    return val_bpc


def _log_eval(run_dir: Path, state: dict, val_loss: float, val_bpc: float, tokens: int, dist_info: Dist,
              log) -> None:
    state["last_val_loss"] = val_loss
    if dist_info.is_main:
        ckpt.append_metrics(run_dir, {"kind": "eval", "step": state["step"], "val_loss": val_loss,
                                      "val_bpc": val_bpc, "val_tokens": tokens, "elapsed": state["elapsed"]})
        log(f"step {state['step']}: val loss {val_loss:.4f} nats/token, {val_bpc:.4f} bpc"
            + (f" ({tokens:,} tokens)" if state.get("eval_tokens") else ""))


def _interrupted(run_dir: Path, evaluate, sample, save_last_now, model, state: dict, dist_info: Dist, log,
                 eval_tokens: int | None, averaged) -> TrainResult:
    """Save what an interrupted run has, so that generate, evaluate and info accept it; then raise."""
    if state["best_val_loss"] is None:  # nothing to sample from yet: score the current weights and keep them
        with averaged():
            if state.get("plan") is not None:
                _evaluate_and_save(evaluate, sample, eval_tokens, run_dir, model, state, dist_info, log)
            elif dist_info.is_main:  # stopped while calibrating: the untrained weights, unscored
                ckpt.save_tensors(run_dir / ckpt.WEIGHTS_FILE, ckpt.model_tensors(model), metadata={"step": "0"})
    state["status"], state["stop_reason"] = "interrupted", f"interrupted at step {state['step']}"
    save_last_now()
    if dist_info.is_main:
        plot_losses(run_dir, log)
    barrier(dist_info)  # torchrun stops every rank when one exits: none may leave before rank 0 saved
    raise Interrupted(f"training interrupted at step {state['step']}; saved {run_dir}/{ckpt.LAST_DIR}; "
                      f"continue with: textrnn train --resume {run_dir}")


class _Sample:
    """The text sampled at each evaluation: a fixed prompt, seed and temperature, so that samples
    differ only by the weights. It runs the Sampler's fast path (the model's stepper under
    inference mode, in eval mode, drawing from its own seeded generator) and puts the train mode
    back, so training's RNG state and numbers are the same with samples and without."""

    def __init__(self, model: RNNLanguageModel, tokenizer: Tokenizer, device: torch.device, prompt: str,
                 length: int, seed: int):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.prompt, self.length, self.seed = prompt, length, seed

    def text(self) -> str:
        from .sampling import Sampler

        was_training = self.model.training
        try:
            sampler = Sampler(self.model, self.tokenizer, self.device, precision="fp32", engine="torch")
            return sampler.generate(self.prompt, self.length, temperature=SAMPLE_TEMPERATURE, seed=self.seed)
        finally:
            self.model.train(was_training)

    def record(self, run_dir: Path, state: dict, val_loss: float, log) -> None:
        """Sample, append the row to samples.jsonl and show it in the log."""
        start = time.perf_counter()
        text = self.text()
        state["sample_seconds"] = state.get("sample_seconds", 0.0) + time.perf_counter() - start
        ckpt.append_metrics(run_dir, {"step": state["step"], "elapsed": state["elapsed"], "val_loss": val_loss,
                                      "prompt": self.prompt, "temperature": SAMPLE_TEMPERATURE, "text": text},
                            ckpt.SAMPLES_FILE)
        log(f"step {state['step']} sample:\n" + textwrap.indent(self.prompt + text, "  | ", lambda line: True))


def _sample_prompt(config: TrainConfig, tokenizer: Tokenizer, val_ids: np.ndarray) -> str:
    """``sample_prompt``, checked against the vocabulary; by default the first line of the validation
    text (with its newline), or empty."""
    if config.sample_prompt is not None:
        try:
            tokenizer.encode(config.sample_prompt)
        except InputError as exc:
            raise InputError(f"sample prompt: {exc}") from None
        return config.sample_prompt
    head = tokenizer.decode(np.asarray(val_ids[:SAMPLE_PROMPT_TOKENS]).tolist()).strip("\ufffd")
    return head[:head.index("\n") + 1] if "\n" in head else ""


# ---------------------------------------------------------------- setup helpers

def _fingerprints(dataset: Dataset) -> dict[str, str]:
    return {name: data_fingerprint(dataset.path / f"{name}.bin") for name in ("train", "val")}


def _check_same_data(dataset: Dataset, data_config: dict) -> None:
    """Refuse to resume on training data other than the run's (O(1): size and sampled blocks)."""
    if "fingerprint" in data_config:
        current, saved, how = _fingerprints(dataset), data_config["fingerprint"], "fingerprint"
    else:  # a run made before fingerprints: its full sha256
        from .fileio import file_sha256

        current = {name: file_sha256(dataset.path / f"{name}.bin") for name in data_config.get("sha256", {})}
        saved, how = data_config.get("sha256", {}), "sha256"
    for split, digest in saved.items():
        if current.get(split) != digest:
            raise CheckpointError(f"{dataset.path / (split + '.bin')}: changed since the run started "
                                  f"({how} mismatch); resume needs the original data")


def _setup_resume(run_dir: Path, overrides: dict) -> dict:
    config = ckpt.run_config(run_dir)
    train_dict = {**config["train"], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        TrainConfig.from_dict(train_dict, source=str(run_dir / ckpt.CONFIG_FILE))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    config["train"] = train_dict
    return config


# ---------------------------------------------------------------- progress

def _progress_bar(enabled: bool, plan: int, step: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=plan, initial=step, desc="training", unit="step", dynamic_ncols=True, leave=False)


def _bar_update(bar, step: int, loss: float, val_bpc: float | None, rate: float, config: TrainConfig,
                elapsed: float) -> None:
    bar.update(step - bar.n)
    postfix = {"loss": f"{loss:.3f}", "val_bpc": f"{val_bpc:.3f}" if val_bpc else "-", "chars/s": f"{rate:,.0f}"}
    if config.max_time:
        postfix["time_left"] = format_duration(max(0.0, config.max_time - elapsed))
    bar.set_postfix(postfix, refresh=False)


def _progress_line(step: int, plan: int, loss: float, val_bpc: float | None, rate: float, config: TrainConfig,
                   elapsed: float) -> str:
    """The bar as one plain line, for a log that is not a terminal."""
    left = f", {format_duration(max(0.0, config.max_time - elapsed))} left" if config.max_time else ""
    val = f", val bpc {val_bpc:.3f}" if val_bpc else ""
    return (f"step {step:,}/{plan:,} ({100 * step / plan:.0f}%): loss {loss:.3f}{val}, {rate:,.0f} chars/s, "
            f"{format_duration(elapsed)} elapsed{left}")
