"""The training loop: truncated BPTT, AdamW on a step-planned schedule, clipping, evaluation,
atomic checkpoints, exact resume, signals and DDP.

How a run flows (``_train``, top to bottom):

    _open_new / _setup_resume   the run directory and config.json (new, fine-tune or resume)
    _Run(...) and run.start()   data streams, model, optimizer, the RunState (new or from last/)
    _plan                       a time budget: time a few real steps, take them back, plan N steps
    _loop                       until the plan is done, a signal, or the budget says stop:
        run.train_step(lr)          the next (B, L) window of every stream -> forward -> loss ->
                                    backward -> clip -> optimizer step; the state carries over, detached
        run.count(...)              a non-finite or exploding step is skipped; several in a row stop the run
        _TrainLog.row(...)          a metrics.jsonl row every log_every steps, and the bar
        run.evaluate_and_keep()     at state.next_eval: replan a time budget, score, keep the best
                                    weights, sample, save last/
    run.finish / run.interrupted    the last evaluation and save, or save and say how to resume

The schedule lives in ``schedule.py``, the plan in ``budget.py``, the state and ``last/`` in
``runstate.py``, collectives in ``distributed.py`` and the plot in ``plot.py``; docs/trainer.md
says where to add an optimizer, a stop rule or an evaluation. Nothing here prints: messages go to
the ``log`` callback, the bar to stderr.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .averaging import WeightAverage
from .config import (AUTO_FITTED, DEFAULT_PRESET, ModelConfig, TrainConfig, auto_regularisation, auto_shape,
                     format_duration, preset)
from .data import Dataset, TrainStreams, is_dataset_dir, load_dataset, preprocess
from .distributed import Dist, agree, barrier, broadcast, gather_hidden, gather_rng, init_distributed, reduce_step
from .errors import CheckpointError, ConfigError, InputError, TextRNNError, TrainingError
from .evaluation import evaluate_ids, summarize
from .model import RNNLanguageModel, State, detach_state
from .plot import plot_losses
from .runstate import RunState, data_fingerprint, restore, save_last
from .runtime import autocast, choose_threads, resolve_precision, set_seed
from .budget import Replay, make_plan, measure_costs, over_budget, replan, rollback, snapshot, time_steps
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
          started: float | None = None, replay: str | os.PathLike | None = None,
          fit: Iterable[str] | None = None) -> TrainResult:
    """Train a model and write its run directory; or continue one with ``resume=RUN_DIR``.

    ``inputs`` is text files, a directory of them, or one directory made by ``preprocess``.
    ``resume_overrides`` changes what a resumed run may change (``config.RESUME_OVERRIDES``).
    ``init_from=RUN_DIR`` fine-tunes: a new run that starts from that run's best weights, model
    and tokenizer (``model_config`` may then change only its dropout and weight drop; see ``read_base``).
    ``tokenizer`` is ``char`` unless given, or the base's with ``init_from``.
    ``should_stop(step)`` lets a caller stop at a step boundary, as a signal would. ``started``
    (a ``time.perf_counter()`` value) is when the time budget began: the process's start for the
    CLI, the call otherwise. ``replay=RUN_DIR`` trains a finished run again as a new run in
    ``out_dir`` (``RUN_DIR-replay`` by default), following the plans it recorded (``budget.Replay``).
    ``fit`` names the model settings that ``--preset auto`` fits to the corpus once the plan is
    known (``config.AUTO_FITTED``); by default all of them when no ``model_config`` is given.
    """
    started = time.perf_counter() if started is None else started
    overrides = resume_overrides or {}
    if resume and init_from:
        raise ConfigError("init_from starts a new run from a trained one and resume continues a run; give one")
    replayed = None
    if replay:
        if resume or init_from or inputs:
            raise ConfigError("replay trains a finished run again on its own data and settings; give it alone")
        inputs, model_config, train_config, replayed = _read_replay(Path(replay))
        out_dir = out_dir or Path(replay).with_name(Path(replay).name + "-replay")
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
                      fit=list(AUTO_FITTED if fit is None and model_config is None else fit or ()),
                      progress=progress, log=log, should_stop=should_stop, started=started, replay=replayed)
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
           log: Callable[[str], None], should_stop, started: float, replay: Replay | None,
           fit: list[str]) -> TrainResult:
    """``train`` on this process's rank and device: the arguments are train's, named."""
    if replay is not None and replay.state.world_size != dist_info.world_size:
        raise ConfigError(f"the run was trained by {replay.state.world_size} process(es); replay it on as many")
    log = log if dist_info.is_main else _NO_LOG
    progress = progress and dist_info.is_main
    # before anything is written: TEXTRNN_THREADS may be wrong, and the load is read before the work starts
    threads = choose_threads(overrides.get("threads") if resume else (train_config or TrainConfig()).threads)
    if resume:
        run_dir, config, preprocess_time = Path(resume), _setup_resume(Path(resume), overrides), 0.0
    else:
        run_dir, config, preprocess_time = _open_new(dist_info, device, inputs, out_dir, model_config, train_config,
                                                     init_from, data_settings, progress, log, fit)
    run = _Run(dist_info, device, run_dir, config, resumed=bool(resume), log=log, started=started,
               preprocess_time=preprocess_time)
    run.replay = replay
    run.start(threads, keep_threads=bool(resume) and not overrides.get("threads"))
    with _StopSignal(repeat_grace=2.0 if dist_info.enabled else 0.0) as signals:
        if not _plan(run, signals):
            run.interrupted(eval_tokens=None)  # a signal came while calibrating
        stop_reason = _loop(run, signals, should_stop, progress)
        if stop_reason.startswith("interrupted"):
            run.interrupted(run.state.eval_tokens)
        run.finish(stop_reason)
    if dist_info.is_main:
        plot_losses(run_dir, log)
    return run.result(stop_reason)


def _open_new(dist_info: Dist, device: torch.device, inputs, out_dir, model_config: ModelConfig | None,
              train_config: TrainConfig | None, init_from, data_settings: dict, progress: bool,
              log, fit: list[str]) -> tuple[Path, dict, float]:
    """A new run, or a fine-tune of ``init_from``: rank 0 makes the run directory and config.json
    and every rank gets the same config. Returns the directory, the config and the seconds spent
    preprocessing."""
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
            run_dir, config, seconds = _setup_new(dist_info, inputs, out_dir, model_config, train_config, base,
                                                  [] if base else fit, progress=progress, log=log, **data_settings)
            setup = (str(run_dir), config, seconds)
        except BaseException as exc:  # whatever failed, release the other ranks waiting in the broadcast
            if dist_info.enabled:
                broadcast({"error": str(exc) or type(exc).__name__}, dist_info)
            raise
    setup = broadcast(setup, dist_info)
    if isinstance(setup, dict):
        raise InputError(setup["error"])
    if setup[2] >= 0.5:
        log(f"preprocessed in {format_duration(setup[2])} (not counted in the time budget)")
    return Path(setup[0]), setup[1], setup[2]


# ---------------------------------------------------------------- the plan and the loop

def _plan(run: "_Run", signals: _StopSignal) -> bool:
    """Plan the steps, unless a resumed run has a plan for the same limits. A time budget is first
    timed on a few real steps, which are then taken back. False if a signal came while timing."""
    config = run.train_config
    limits = {k: getattr(config, k) for k in ("max_steps", "max_time", "epochs", "eval_every", "eval_tokens")}
    if run.replay is not None:
        run.replay.plan(run.state)
    elif run.state.plan is None or run.state.limits != limits:
        costs = None
        if config.max_time:
            costs = _calibrate(run, signals)
            if costs is None:
                return False
        make_plan(run.state, config, costs, agree(run.clock(), False, run.dist_info, run.device)[0],
                  run.streams.steps_per_epoch, run.val_tokens, limits, run.dist_info, run.log)
        if run.config.get("auto", {}).get("fit") and _fit_to_corpus(run) and config.max_time:
            run.state.plans.clear()  # DropConnect changed the speed of a step: time and plan again
            costs = _calibrate(run, signals)
            if costs is None:
                return False
            make_plan(run.state, config, costs, agree(run.clock(), False, run.dist_info, run.device)[0],
                      run.streams.steps_per_epoch, run.val_tokens, limits, run.dist_info, run.log)
    run.costs = Costs(**run.state.costs) if run.state.costs else None
    run.final_cost = run.costs.final(run.val_tokens) if run.costs else 0.0
    return True


def _fit_to_corpus(run: "_Run") -> bool:
    """``--preset auto``, once the plan is known: dropout and weight drop for the epochs it will
    read (``config.auto_regularisation``), set in place (neither takes part in building the
    weights) and recorded in config.json with the reason. Whether the speed of a step changed."""
    plan, fit = run.state.plan, run.config["auto"]["fit"]
    train_tokens = len(run.train_ids)
    epochs = plan * run.batch * run.train_config.seq_len * run.dist_info.world_size / train_tokens
    rule = auto_regularisation(epochs, train_tokens, floor=run.model_config.dropout)
    chosen = {k: v for k, v in rule.items() if k in fit}
    before = run.model_config.weight_drop
    run.model.set_regularisation(chosen.get("dropout", run.model_config.dropout),
                                 chosen.get("weight_drop", before))
    shape = run.config["auto"].get("shape")  # the width _fit_shape chose for the text (a time budget's)
    lead = (f"auto: {shape} for {train_tokens:,} training tokens in {format_duration(run.train_config.max_time)}; "
            "the plan reads them" if shape else f"auto: the plan reads the {train_tokens:,} training tokens")
    why = f"{lead} {epochs:.1f} times"
    if chosen:
        why += ", so " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in chosen.items())
    run.log(why)
    if shape:
        chosen = {"hidden_size": run.model_config.hidden_size, **chosen}
    run.config["model"] = run.model_config.to_dict()
    run.config["auto"] = {"fit": [], "planned_epochs": round(epochs, 2), "train_tokens": train_tokens,
                          "chose": chosen, "why": why, **({"shape": shape} if shape else {})}
    if run.dist_info.is_main:
        on_disk = ckpt.run_config(run.run_dir)
        on_disk["model"], on_disk["auto"] = run.config["model"], run.config["auto"]
        ckpt.write_json(run.run_dir / ckpt.CONFIG_FILE, on_disk)
    return (before > 0) != (run.model_config.weight_drop > 0)


def _calibrate(run: "_Run", signals: _StopSignal) -> Costs | None:
    """What a time budget costs: a few real training steps, timed and taken back, then an
    evaluation, a sample, a save and the plot. None if a signal came first."""
    run.model.train()
    saved = snapshot(run.model, run.optimizer, run.state, run.hidden)
    saved_average = run.average.copy() if run.average else None
    step_seconds = time_steps(run.train_step, run.train_config, run.clock, signals, run.dist_info, run.device)
    run.state, run.hidden = rollback(saved, run.model, run.optimizer)
    if run.average:
        run.average.put_back(saved_average)
    if step_seconds is None:
        return None
    return measure_costs(step_seconds, run.evaluate, run.sample, run.save_last_now, run.run_dir, run.val_tokens,
                         run.train_config, run.dist_info)


def _loop(run: "_Run", signals: _StopSignal, should_stop, progress: bool) -> str:
    """Train until the plan is done, a signal or ``should_stop`` asks, or the budget runs out; the reason."""
    state, config = run.state, run.train_config
    report = _TrainLog(run, progress)
    pace = _Pace(run.costs.step if run.costs else 0.0)
    run.model.train()
    run.interval_start = (state.step, run.clock())
    try:
        while True:
            reason = _why_stop(run, signals, should_stop, pace)
            if reason:
                return reason
            lr = learning_rate(config, state.step, state.plan)
            loss, grad_norm, bad = run.train_step(lr)  # batch, forward, loss, backward, clip, step
            pace.stepped()
            run.count(loss, grad_norm, bad)  # several bad steps in a row stop the run
            report.row(lr, grad_norm)
            if run.consecutive_bad:
                continue  # never evaluate or save in the middle of a bad streak
            if state.next_eval <= state.step < state.plan:
                report.val_bpc = run.evaluate_and_keep()
                pace.pause()  # the evaluation is not a step
            elif config.checkpoint_every and state.step % config.checkpoint_every == 0:
                state.elapsed = run.clock()
                run.save_last_now()
                pace.pause()
    finally:
        report.close()


def _why_stop(run: "_Run", signals: _StopSignal, should_stop, pace: "_Pace") -> str:
    """Why to stop before the next step, or "": every rank sees the same clock and decides the same."""
    state = run.state
    interrupt = signals.received or (should_stop and should_stop(state.step) and "stop requested")
    elapsed, interrupted = agree(run.clock(), bool(interrupt), run.dist_info, run.device)
    state.elapsed = elapsed
    pace.tick(elapsed)
    if run.replay is not None and state.step >= run.replay.stop_step:  # where the replayed run stopped
        return run.replay.stop_reason
    if state.step >= state.plan:
        return state.plan_reason
    if interrupted:
        return f"interrupted ({interrupt or 'another rank'})"
    if run.replay is None and over_budget(run.train_config, elapsed, pace.seconds, run.final_cost):
        return (f"time budget: stopped at step {state.step} of the planned {state.plan}, "
                f"as the machine ran slower than calibrated")
    return ""


class _Pace:
    """Seconds a training step takes: an exponential average over whole steps, evaluations and
    saves left out, from the clock every rank agreed on (so the same on every rank)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._now: float | None = None
        self._previous: float | None = None  # the clock before the last step, None after a pause

    def tick(self, elapsed: float) -> None:
        if self._previous is not None:
            last = elapsed - self._previous
            self.seconds = 0.8 * self.seconds + 0.2 * last if self.seconds else last
        self._now = elapsed

    def stepped(self) -> None:
        self._previous = self._now

    def pause(self) -> None:
        self._previous = None


class _TrainLog:
    """The train rows of metrics.jsonl (the mean loss since the last row, every ``log_every``
    steps), and the progress bar, or a plain line now and then when stderr is not a terminal."""

    def __init__(self, run: "_Run", progress: bool) -> None:
        self.run = run
        self.bar = _progress_bar(progress, run.state.plan, run.state.step)
        self.tokens_per_step = run.batch * run.train_config.seq_len * run.dist_info.world_size
        self.last_time = self.last_plain = time.perf_counter()
        self.last_step = run.state.step
        self.val_bpc = run.state.best_val_bpc

    def row(self, lr: float, grad_norm: float) -> None:
        run, state, config = self.run, self.run.state, self.run.train_config
        step, window = state.step, state.loss_window  # the window is kept in state.json: a resumed run logs the same rows
        if step % config.log_every or not window:
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
            return
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tokens_per_step * run.chars_per_token["train"] / (now - self.last_time)
        loss = float(np.mean(window))
        if run.dist_info.is_main:
            ckpt.append_metrics(run.run_dir, {"kind": "train", "step": step, "loss": loss, "lr": lr,
                                              "grad_norm": grad_norm, "chars_per_sec": rate, "elapsed": run.clock()})
        if self.bar is not None:
            _bar_update(self.bar, step, loss, self.val_bpc, rate, config, run.clock())
        elif now - self.last_plain >= PLAIN_LOG_SECONDS:
            run.log(_progress_line(step, state.plan, loss, self.val_bpc, rate, config, run.clock()))
            self.last_plain = now
        window.clear()  # on every rank, so that no rank's window grows without end
        self.last_time, self.last_step = now, step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- one process's run

class _Run:
    """One process's share of a run: its streams, model, optimizer and ``RunState``, and the steps,
    evaluations and saves that change them. ``_train`` makes it; the phases call its methods."""

    costs: Costs | None = None  # of a time budget, once planned
    replay: Replay | None = None  # the plans to follow instead of the clock (train --replay)
    final_cost: float = 0.0  # seconds the last evaluation and save take
    consecutive_bad = 0

    def __init__(self, dist_info: Dist, device: torch.device, run_dir: Path, config: dict, *, resumed: bool, log,
                 started: float, preprocess_time: float) -> None:
        self.dist_info, self.device, self.run_dir, self.config, self.log = dist_info, device, run_dir, config, log
        self.resumed, self.started, self.preprocess_time = resumed, started, preprocess_time
        self.model_config = ModelConfig.from_dict(config["model"])
        self.train_config = tc = TrainConfig.from_dict(config["train"])
        self.dataset = _load_data(run_dir, config, resumed)
        self.precision = resolve_precision(tc.precision, device)
        # this rank's block of the world_size x batch_size streams
        self.train_ids, self.val_ids = self.dataset.split("train"), self.dataset.split("val")
        self.batch = tc.batch_size
        self.streams = TrainStreams(self.train_ids, tc.seq_len, self.batch, tc.seed,
                                    total_streams=self.batch * dist_info.world_size, first=self.batch * dist_info.rank)
        if len(self.val_ids) < 2:
            raise InputError(f"{self.dataset.path}: the validation split has {len(self.val_ids)} tokens; "
                             f"raise --val-fraction")
        self.val_tokens = len(self.val_ids) - 1
        self.chars_per_token = config["data"]["chars_per_token"]
        self.diverged_loss = DIVERGED_FACTOR * math.log(max(self.model_config.vocab_size, 2))
        set_seed(tc.seed)
        self.model = RNNLanguageModel(self.model_config).to(device)
        if not resumed and config.get("init_from"):  # fine-tuning: the base's weights (a resumed run has its own)
            start_from_base(self.model, Path(config["init_from"]["path"]), self.dataset.tokenizer)
        if dist_info.enabled:  # the same initial weights everywhere, but each rank its own dropout masks
            torch.manual_seed(tc.seed + 7919 * dist_info.rank)
        self.optimizer = _optimizer(self.model, tc, fused_ok=device.type in ("cuda", "cpu"))
        self.average = WeightAverage(self.model, tc.ema) if tc.ema else None
        self.state = RunState(world_size=dist_info.world_size)
        self.hidden: State | None = None

    def start(self, threads: tuple[int, str], keep_threads: bool) -> None:
        """The state to go on from (new, or restored from ``last/``), the threads, the model as it
        trains (compiled, DDP), and the run's first log line."""
        if self.resumed:
            self._restore()
        self.state.status = "training"
        count, why = threads
        if keep_threads and self.state.threads:
            count, why = self.state.threads, "as the run started"  # the same threads give the same numbers
        if self.device.type == "cpu":
            torch.set_num_threads(count)
        self.state.threads = count
        self.train_model: torch.nn.Module = torch.compile(self.model) if self.train_config.compile else self.model
        if self.dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.hidden is None:
            self.hidden = self.model.init_state(self.batch, self.device)
        self._record_evaluation()
        self.sample = self._sample()
        self._elapsed_before = self.state.elapsed
        self._announce(count, why)

    def _restore(self) -> None:
        self.state, self.hidden = restore(self.run_dir, self.model, self.optimizer, self.dist_info, self.device,
                                          self.log, self.average)
        if self.dist_info.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
            ckpt.truncate_metrics(self.run_dir, self.state.step)
            ckpt.truncate_metrics(self.run_dir, self.state.step, ckpt.SAMPLES_FILE)
            ckpt.write_json(self.run_dir / ckpt.CONFIG_FILE, self.config)  # keep new limits for the next resume
        self.log(f"resumed from step {self.state.step} ({format_duration(self.state.elapsed)} trained)")

    def _record_evaluation(self) -> None:
        """What ``evaluate`` needs to score as the trainer does, in config.json: the streams (as many as
        train streams over all ranks, so N ranks x B report what 1 x N*B would) and the precision."""
        self.eval_streams = self.train_config.eval_batches or self.batch * self.dist_info.world_size
        evaluation = {"streams": self.eval_streams, "precision": self.precision}
        if self.dist_info.is_main and self.config.get("evaluation") != evaluation:  # new, or resumed elsewhere
            on_disk = ckpt.run_config(self.run_dir)  # not the in-memory config: resume overrides stay out of the file
            on_disk["evaluation"] = self.config["evaluation"] = evaluation
            ckpt.write_json(self.run_dir / ckpt.CONFIG_FILE, on_disk)

    def _sample(self) -> "_Sample | None":
        """Rank 0 samples a text at each evaluation, into samples.jsonl; every rank checks the prompt."""
        config = self.train_config
        if not config.sample_length:
            return None
        prompt = _sample_prompt(config, self.dataset.tokenizer, self.val_ids)
        if not self.dist_info.is_main:
            return None
        return _Sample(self.model, self.dataset.tokenizer, self.device, prompt, config.sample_length, config.seed)

    def _announce(self, threads: int, why: str) -> None:
        mc, world = self.model_config, self.dist_info.world_size
        self.log(f"run {self.run_dir}: {mc.cell} {mc.num_layers}x{mc.hidden_size}, "
                 f"{sum(p.numel() for p in self.model.parameters()):,} parameters, {self.device.type} {self.precision}"
                 + (f", {threads} thread{'s' if threads > 1 else ''} ({why})" if self.device.type == "cpu" else "")
                 + f", effective batch {self.batch * world} x {self.train_config.seq_len}"
                 + (f" over {world} processes" if self.dist_info.enabled else ""))

    def clock(self) -> float:
        """Training time of the run so far: earlier sessions, then this process less preprocessing."""
        return self._elapsed_before + time.perf_counter() - self.started - self.preprocess_time

    def averaged(self):
        """What evaluations and saves see: the weight average (--ema) put in place, or the weights."""
        return self.average.applied() if self.average else contextlib.nullcontext()

    # ---- a step

    def train_step(self, lr: float) -> tuple[float, float, bool]:
        """One optimizer step on the next window of every stream: (loss, grad norm, bad).

        batch, forward, loss, backward, clip, step; a bad step (non-finite or exploding) is skipped
        on every rank and its state reset.
        """
        state, model, optimizer = self.state, self.model, self.optimizer
        if state.step_in_epoch >= self.streams.steps_per_epoch:  # new epoch: fresh state, new offset
            state.epoch += 1
            state.step_in_epoch = 0
            self.hidden = model.init_state(self.batch, self.device)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = self.streams.window(state.epoch, state.step_in_epoch)
        x_t = torch.from_numpy(x).to(self.device, non_blocking=True)  # (B, L)
        y_t = torch.from_numpy(y).to(self.device, non_blocking=True)  # (B, L)
        with autocast(self.device, self.precision):
            logits, hidden = self.train_model(x_t, self.hidden)  # (B, L, V)
        loss = _loss(logits, y_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.train_config.grad_clip or float("inf"))
        loss_value, norm_value = float(loss.detach()), float(grad_norm)
        bad = not (math.isfinite(loss_value) and math.isfinite(norm_value)) or loss_value > self.diverged_loss
        bad, loss_value = reduce_step(bad, loss_value, self.dist_info, self.device)  # the same on every rank
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self.hidden = model.init_state(self.batch, self.device)  # a poisoned state must not carry on
        else:
            optimizer.step()
            if self.average is not None:
                self.average.update(state.step)
            self.hidden = detach_state(hidden)
        state.step += 1
        state.step_in_epoch += 1
        return loss_value, norm_value, bad

    def count(self, loss: float, grad_norm: float, bad: bool) -> None:
        """Keep a good step's loss for the next train row; count a bad one, and stop the run
        (the last good checkpoint kept) after ``max_bad_steps`` in a row."""
        if not bad:
            self.consecutive_bad = 0
            self.state.loss_window.append(loss)
            return
        self.consecutive_bad += 1
        self.state.bad_steps += 1
        step = self.state.step - 1
        self.log(f"step {step}: skipped a bad step (loss {loss:.4g}, grad norm {grad_norm:.4g}); "
                 f"{self.consecutive_bad} in a row")
        if self.consecutive_bad >= self.train_config.max_bad_steps:
            raise TrainingError(f"training diverged: {self.consecutive_bad} bad steps in a row at step {step} "
                                f"(non-finite or exploding loss); {_what_is_kept(self.run_dir)}; "
                                f"try a lower --lr or a tighter --clip")

    # ---- evaluation and saving

    def evaluate(self, tokens: int | None = None) -> tuple[float, float, int]:
        """Validation loss, bpc and tokens scored, over the first ``tokens`` tokens (all for None)."""
        ids = self.val_ids if tokens is None or tokens + 1 >= len(self.val_ids) else self.val_ids[:tokens + 1]
        loss_sum, count = evaluate_ids(self.model, ids, seq_len=self.train_config.seq_len, streams=self.eval_streams,
                                       device=self.device, precision=self.precision, rank=self.dist_info.rank,
                                       world_size=self.dist_info.world_size)
        result = summarize(loss_sum, count, self.chars_per_token["val"])
        return result.loss, result.bpc, count

    def evaluate_and_keep(self) -> float:
        """A planned evaluation: replan a time budget from the speed since the last one, score,
        keep the best weights, sample, save ``last/``. Returns the val bpc."""
        state, config = self.state, self.train_config
        state.elapsed = self.clock()
        start_step, start_time = self.interval_start
        if self.replay is not None:
            self.replay.replan(state)
        elif config.max_time and state.step > start_step:
            speed = (state.elapsed - start_time) / (state.step - start_step)
            replan(state, config, self.costs, speed, self.val_tokens, self.dist_info, self.log)
        with self.averaged():
            val_bpc = self.score(state.eval_tokens)
        state.next_eval = state.step + state.eval_every
        self.save_last_now()
        self.interval_start = (state.step, self.clock())
        return val_bpc

    def score(self, tokens: int | None) -> float:
        """Evaluate; keep the weights if they are the best so far; log an eval row and a sample. Returns the bpc."""
        state = self.state
        val_loss, val_bpc, count = self.evaluate(tokens)
        if not math.isfinite(val_loss):
            raise TrainingError(f"validation loss is {val_loss} at step {state.step}; training diverged; "
                                f"{_what_is_kept(self.run_dir)}")
        state.last_eval_step = state.step
        state.evaluations_done += 1
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            state.best_val_loss, state.best_val_bpc = val_loss, val_bpc
            if self.dist_info.is_main:
                ckpt.save_tensors(self.run_dir / ckpt.WEIGHTS_FILE, ckpt.model_tensors(self.model),
                                  metadata={"step": str(state.step), "val_loss": repr(val_loss)})
        self.log_eval(val_loss, val_bpc, count)
        if self.sample is not None:
            self.sample.record(self.run_dir, state, val_loss, self.log)
        return val_bpc

    def log_eval(self, val_loss: float, val_bpc: float, tokens: int) -> None:
        state = self.state
        state.last_val_loss = val_loss
        if self.dist_info.is_main:
            ckpt.append_metrics(self.run_dir, {"kind": "eval", "step": state.step, "val_loss": val_loss,
                                               "val_bpc": val_bpc, "val_tokens": tokens, "elapsed": state.elapsed})
            self.log(f"step {state.step}: val loss {val_loss:.4f} nats/token, {val_bpc:.4f} bpc"
                     + (f" ({tokens:,} tokens)" if state.eval_tokens else ""))

    def save_last_now(self) -> None:
        if not _check_finite(self.model):
            raise TrainingError(f"{self.run_dir}: weights hold NaN or inf; not saving them (the last good "
                                f"checkpoint is kept)")
        every_stream = gather_hidden(self.hidden, self.dist_info)  # collectives: all ranks take part
        rng = gather_rng(self.dist_info, self.device)
        if self.dist_info.is_main:
            save_last(self.run_dir, self.model, self.optimizer, self.state, every_stream, rng, self.dist_info,
                      self.average)

    # ---- the end

    def finish(self, stop_reason: str) -> None:
        """A finished run: the final weights scored on the periodic evaluations' tokens (unless the
        last step had one), then on the whole split if those were fewer; ``last/`` saved."""
        state = self.state
        state.elapsed = self.clock()
        if state.last_eval_step != state.step:
            with self.averaged():
                self.score(state.eval_tokens)
        if state.eval_tokens is not None and state.complete_eval_step != state.step:
            state.elapsed = self.clock()
            with self.averaged():
                full_loss, full_bpc, count = self.evaluate(None)
            state.complete_eval_step = state.step
            self.log_eval(full_loss, full_bpc, count)
        state.elapsed = self.clock()
        state.status, state.stop_reason = "finished", stop_reason
        self.save_last_now()

    def interrupted(self, eval_tokens: int | None) -> NoReturn:
        """Save what an interrupted run has, so that generate, evaluate and info accept it; then raise."""
        state = self.state
        state.elapsed = self.clock()
        if state.best_val_loss is None:  # nothing to sample from yet: score the current weights and keep them
            with self.averaged():
                if state.plan is not None:
                    self.score(eval_tokens)
                elif self.dist_info.is_main:  # stopped while calibrating: the untrained weights, unscored
                    ckpt.save_tensors(self.run_dir / ckpt.WEIGHTS_FILE, ckpt.model_tensors(self.model),
                                      metadata={"step": "0"})
        state.status, state.stop_reason = "interrupted", f"interrupted at step {state.step}"
        self.save_last_now()
        if self.dist_info.is_main:
            plot_losses(self.run_dir, self.log)
        barrier(self.dist_info)  # torchrun stops every rank when one exits: none may leave before rank 0 saved
        raise Interrupted(f"training interrupted at step {state.step}; saved {self.run_dir}/{ckpt.LAST_DIR}; "
                          f"continue with: textrnn train --resume {self.run_dir}")

    def result(self, stop_reason: str) -> TrainResult:
        state = self.state
        return TrainResult(self.run_dir, state.step, state.best_val_loss, state.best_val_bpc, self.clock(),
                           stop_reason, state.plan, state.last_val_loss,
                           time.perf_counter() - self.started - self.preprocess_time, self.preprocess_time)


def _setup_new(dist_info, inputs, out_dir, model_config, train_config, base: "Base | None", fit: list[str],
               tokenizer, vocab_size, val_fraction, errors, progress, log) -> tuple[Path, dict, float]:
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
        widened = _fit_shape(model_config, train_config, dataset.meta["splits"]["train"]["tokens"], fit)
        model_config.vocab_size = dataset.tokenizer.vocab_size
        dataset.tokenizer.save(run_dir)
        config = {
            "format": ckpt.RUN_FORMAT, "version": ckpt.FORMAT_VERSION,
            "model": model_config.to_dict(), "train": train_config.to_dict(),
            "tokenizer": dataset.tokenizer.to_dict(),
            "data": {"path": _data_path_for_config(data_dir, run_dir), "fingerprint": _fingerprints(dataset),
                     "chars_per_token": {s: dataset.chars_per_token(s) for s in ("train", "val")}},
            "world_size": dist_info.world_size, "torch": torch.__version__,
            "auto": {"fit": fit, **widened},  # what _fit_to_corpus may still set; then what it chose, and why
        }
        if base:
            config["init_from"] = base_record(base, dataset.tokenizer, log)
        ckpt.write_json(run_dir / ckpt.CONFIG_FILE, config)
    except BaseException:
        if created:  # a run that cannot start leaves nothing behind (not even the preprocessed data)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, config, preprocess_time


def _fit_shape(model_config: ModelConfig, train_config: TrainConfig, train_tokens: int, fit: list[str]) -> dict:
    """``--preset auto`` with no shape given, once the corpus is known: the shape for the budget and
    the text (``config.auto_shape``), set in place with its least dropout (unless the dropout was
    given). ``{"shape": "2x384"}`` if the text widened the model, else nothing."""
    shape = auto_shape(train_config.max_time, train_tokens)
    if "hidden_size" not in fit or shape["hidden_size"] == model_config.hidden_size:
        return {}
    for key, value in shape.items():
        if key != "dropout":
            setattr(model_config, key, value)
    if "dropout" in fit:
        model_config.dropout = max(model_config.dropout, shape["dropout"])
    return {"shape": f"{model_config.num_layers}x{model_config.hidden_size}"}


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


# ---------------------------------------------------------------- samples while training

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

    def record(self, run_dir: Path, state: RunState, val_loss: float, log) -> None:
        """Sample, append the row to samples.jsonl and show it in the log."""
        start = time.perf_counter()
        text = self.text()
        state.sample_seconds += time.perf_counter() - start
        ckpt.append_metrics(run_dir, {"step": state.step, "elapsed": state.elapsed, "val_loss": val_loss,
                                      "prompt": self.prompt, "temperature": SAMPLE_TEMPERATURE, "text": text},
                            ckpt.SAMPLES_FILE)
        log(f"step {state.step} sample:\n" + textwrap.indent(self.prompt + text, "  | ", lambda line: True))


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


def _read_replay(run_dir: Path) -> tuple[list[Path], ModelConfig, TrainConfig, Replay]:
    """What ``train --replay`` needs of a finished run: its data, its settings (its threads too) and its plans."""
    config = ckpt.run_config(run_dir)
    if config.get("init_from"):
        raise CheckpointError(f"{run_dir}: a fine-tuned run; replay covers runs trained from scratch")
    state_file = ckpt.last_dir(run_dir) / ckpt.STATE_FILE
    saved = ckpt.read_json(state_file, "checkpoint")
    ckpt.check_format(saved, "textrnn-state", state_file)
    replay = Replay(run_dir, RunState.from_dict(saved, state_file))
    dataset = _load_data(run_dir, config, resumed=True)  # the very data it trained on
    train_config = TrainConfig.from_dict(config["train"], source=str(run_dir / ckpt.CONFIG_FILE))
    train_config.threads = replay.state.threads or train_config.threads
    return [dataset.path], ModelConfig.from_dict(config["model"], str(run_dir / ckpt.CONFIG_FILE)), train_config, replay


def _load_data(run_dir: Path, config: dict, resumed: bool) -> Dataset:
    """The run's token ids; a resumed run's must be the ones it started on (every rank checks its
    own copy, so all raise together and none waits in a collective)."""
    data_path = run_dir / config["data"]["path"]  # relative to the run, or absolute
    dataset = load_dataset(data_path) if data_path.is_dir() else None
    if dataset is None:
        raise CheckpointError(f"{run_dir}: training data {config['data']['path']} is missing")
    if resumed:
        _check_same_data(dataset, config["data"])
    return dataset


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
