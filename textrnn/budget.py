"""A time budget turned into a step plan: calibration (real steps, then taken back), the plan, and
replanning when the machine's speed changes. The schedule that follows the plan is in ``schedule.py``.

Every decision is made on rank 0's numbers and broadcast, so all ranks keep the same plan.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, format_duration
from .distributed import Dist, agree, broadcast
from .errors import CheckpointError
from .model import State
from .plot import plot_losses
from .runstate import RunState
from .schedule import BUDGET_TARGET, EVALUATIONS, Costs, eval_interval, eval_token_cap, learning_rate, plan_steps

DEFAULT_EVAL_TOKENS = 1 << 20  # periodic evaluations of a step-limited run read at most this much
CALIBRATION_SHARE, CALIBRATION_MIN, CALIBRATION_MAX = 0.02, 0.3, 5.0  # seconds of timed calibration steps
CALIBRATION_WARMUP = 2  # untimed first steps (oneDNN builds its kernels on the first calls)
REPLAN_TOLERANCE = 0.03  # a time budget is replanned when it would end further than this share away
EXIT_SECONDS = 1.0  # after the summary: the interpreter and torch shutting down


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState, hidden: State) -> dict:
    """Everything a training step changes, copied, so that calibration steps can be taken back."""
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
            "state": copy.deepcopy(state), "hidden": tuple(h.clone() for h in hidden),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def rollback(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[RunState, State]:
    """Put back what ``snapshot`` copied; returns the run state and hidden state to carry on with."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved["state"], saved["hidden"]


def time_steps(train_step, config: TrainConfig, clock, signals, dist_info: Dist, device) -> float | None:
    """Seconds per training step: the median of a few real steps after two untimed ones (oneDNN
    builds its kernels on the first calls). None if a signal came first."""
    target = min(max(CALIBRATION_SHARE * (config.max_time - clock()), CALIBRATION_MIN), CALIBRATION_MAX)
    times: list[float] = []
    begun = None
    for step in range(10**9):
        spent = 0.0 if begun is None else time.perf_counter() - begun
        spent, interrupted = agree(spent, bool(signals.received), dist_info, device)  # the same on every rank
        if interrupted:
            return None
        if times and ((len(times) >= 3 and spent >= target) or spent >= 3 * target):
            break
        start = time.perf_counter()
        train_step(learning_rate(config, step, 10**9))  # taken back afterwards, so any sensible rate does
        if step >= CALIBRATION_WARMUP:
            times.append(time.perf_counter() - start)
            begun = begun or start
    return float(np.median(times))


def measure_costs(step_seconds: float, evaluate, sample, save_last_now, run_dir: Path, val_tokens: int,
                   config: TrainConfig, dist_info: Dist) -> Costs:
    """What a time budget pays besides steps: evaluation per token, its sample, a save, and the plot."""
    probe = min(val_tokens, 2 * config.seq_len * (config.eval_batches or config.batch_size * dist_info.world_size))
    evaluate(min(probe, config.seq_len))  # the first call in eval mode builds its kernels
    start = time.perf_counter()
    evaluate(probe)
    eval_token = (time.perf_counter() - start) / probe
    sample_seconds = 0.0
    if sample is not None:  # rank 0 samples while the others wait at the next collective
        sample.text()  # the first call pays one-time costs
        start = time.perf_counter()
        sample.text()
        sample_seconds = time.perf_counter() - start
    start = time.perf_counter()
    save_last_now()
    save = time.perf_counter() - start
    if dist_info.is_main:
        plot_losses(run_dir)  # the first call imports matplotlib: paid now, once
    start = time.perf_counter()
    if dist_info.is_main:
        plot_losses(run_dir)
    finish = time.perf_counter() - start + EXIT_SECONDS
    return Costs(**broadcast(Costs(step_seconds, eval_token, save, finish, sample_seconds).__dict__, dist_info))


def make_plan(state: RunState, config: TrainConfig, costs: Costs | None, elapsed: float, steps_per_epoch: int,
               val_tokens: int, limits: dict, dist_info: Dist, log) -> None:
    """Record in ``state`` the planned steps and why they end, the evaluation interval and tokens."""
    candidates = []
    if config.max_steps:
        candidates.append((config.max_steps, f"reached max_steps {config.max_steps}"))
    if config.epochs:
        candidates.append((max(1, int(config.epochs * steps_per_epoch)), f"finished {config.epochs:g} epoch(s)"))
    cap = min(candidates)[0] if candidates else None  # the step and epoch limits bound any replanning
    eval_tokens = config.eval_tokens
    if config.max_time:
        budget_left = config.max_time - elapsed
        if eval_tokens is None:
            eval_tokens = eval_token_cap(costs, budget_left, val_tokens)
        steps = state.step + plan_steps(config, costs, budget_left, val_tokens, eval_tokens or val_tokens)
        candidates.append((steps, f"completed the {steps:,} steps planned for {format_duration(config.max_time)}"))
    elif eval_tokens is None and val_tokens > DEFAULT_EVAL_TOKENS:
        eval_tokens = DEFAULT_EVAL_TOKENS
    if eval_tokens is not None and eval_tokens >= val_tokens:
        eval_tokens = None
    plan, reason = min(candidates)
    plan = broadcast(plan, dist_info)  # rank 0's clock decides
    eval_tokens = broadcast(eval_tokens, dist_info)
    every = eval_interval(config, plan)
    state.plan, state.plan_cap, state.plan_reason = plan, cap, broadcast(reason, dist_info)
    state.eval_every, state.next_eval = every, (state.step // every + 1) * every
    state.evaluations_planned, state.eval_tokens = EVALUATIONS, eval_tokens
    state.limits, state.costs = limits, costs.__dict__ if costs else None
    _record(state, "plan")
    if costs:
        log(f"time budget {format_duration(config.max_time)}: {costs.step * 1000:.0f} ms a step, so a plan of "
            f"{plan:,} steps, evaluating every {state.eval_every:,}"
            + (f" on the first {eval_tokens:,} validation tokens (the last evaluation is complete)"
               if eval_tokens else ""))


def replan(state: RunState, config: TrainConfig, costs: Costs, step_seconds: float, val_tokens: int,
            dist_info: Dist, log) -> int:
    """At an evaluation: if the rest of the plan, at the speed of the last interval, would end more
    than 3% of the budget away from it, plan again, so that the schedule ends as the budget does."""
    plan, step, every = state.plan, state.step, state.eval_every
    periodic, final = costs.periodic(state.eval_tokens or val_tokens), costs.final(val_tokens)
    left = config.max_time - state.elapsed
    projected = (plan - step) * step_seconds + ((plan - step) // every + 1) * periodic + final
    new_plan = plan
    if abs(projected - left * BUDGET_TARGET) > REPLAN_TOLERANCE * config.max_time:
        room = left * BUDGET_TARGET - final - periodic
        new_plan = step + max(1, int(room / (step_seconds + periodic / every)))
        new_plan = min(new_plan, state.plan_cap or new_plan)
    new_plan = broadcast(new_plan, dist_info)
    if new_plan != plan:
        log(f"step {step}: {step_seconds * 1000:.0f} ms a step since the last evaluation; the plan is now "
            f"{new_plan:,} steps instead of {plan:,}")
        state.plan = new_plan
        state.plan_reason = f"completed the {new_plan:,} steps replanned for {format_duration(config.max_time)}"
        if not config.eval_every:  # the evaluations still to come, spread over the new rest of the plan
            evaluations_left = max(1, EVALUATIONS - state.evaluations_done - 1)
            state.eval_every = max(1, (new_plan - step) // evaluations_left)
        _record(state, "replan")
    return new_plan


def _record(state: RunState, kind: str) -> None:
    state.plans.append({"kind": kind, "step": state.step, "plan": state.plan, "eval_every": state.eval_every,
                        "reason": state.plan_reason})


class Replay:
    """The plans a finished run followed, to follow them again: ``train --replay RUN_DIR``.

    A time budget's plan comes from the machine's speed, and is replanned when it changes, so the
    same settings give another run on a busy machine. Replaying takes the recorded plan instead of
    timing steps, applies each replan at the step it was made, and stops where the run stopped:
    with the same threads on the same machine, every loss and weight is the same, bit for bit.
    """

    def __init__(self, run_dir: Path, state: RunState) -> None:
        where = f"{run_dir}: "
        if state.status != "finished":
            raise CheckpointError(where + f"the run is {state.status}, not finished; --resume it first, then replay it")
        if not state.plans:
            raise CheckpointError(where + "the run records no plans (it was made before plans were recorded)")
        if [p["kind"] for p in state.plans].count("plan") != 1:
            raise CheckpointError(where + "the run was planned again on a resume with new limits; "
                                          "replay follows a run planned once")
        self.state, self.first = state, state.plans[0]
        self.replans = {p["step"]: p for p in state.plans[1:]}
        self.stop_step, self.stop_reason = state.step, state.stop_reason

    def plan(self, state: RunState) -> None:
        """The first plan, as the run made it."""
        saved = self.state
        state.plan_cap, state.limits, state.costs, state.eval_tokens = (saved.plan_cap, saved.limits, saved.costs,
                                                                        saved.eval_tokens)
        state.evaluations_planned = saved.evaluations_planned
        self._apply(state, self.first)
        state.next_eval = (state.step // state.eval_every + 1) * state.eval_every

    def replan(self, state: RunState) -> None:
        """At an evaluation: the replan the run made at this step, if it made one."""
        if state.step in self.replans:
            self._apply(state, self.replans[state.step])

    @staticmethod
    def _apply(state: RunState, plan: dict) -> None:
        state.plan, state.eval_every, state.plan_reason = plan["plan"], plan["eval_every"], plan["reason"]
        _record(state, plan["kind"])


def over_budget(config: TrainConfig, elapsed: float, step_seconds: float, final_cost: float) -> bool:
    """Whether one more step would leave too little of a time budget for the final evaluation and save."""
    return bool(config.max_time) and elapsed + step_seconds + final_cost > config.max_time
