"""The step plan and what follows it: learning rate, warmup and evaluation points.

Everything here is a pure function of step counts, never of the clock. A time budget is turned
into a planned number of steps once, after a short calibration (``plan_steps``), and from then
on the run is the same as ``--max-steps`` with that plan: repeatable and exactly resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig

WARMUP_PLAN_FRACTION = 0.05  # warmup never takes more than this share of the planned steps
EVALUATIONS = 10  # evaluations over a run when --eval-every is not given
BUDGET_TARGET = 0.985  # a time budget is planned to end here, leaving room for noise
EVAL_SHARE = 0.10  # periodic evaluations may take at most this share of a time budget


def warmup_steps(config: TrainConfig, plan: int) -> int:
    """Warmup length: ``warmup_steps``, but at most 5% of the plan (a short run must not spend it
    all warming up)."""
    if not config.warmup_steps:
        return 0
    return max(1, min(config.warmup_steps, int(plan * WARMUP_PLAN_FRACTION)))


def learning_rate(config: TrainConfig, step: int, plan: int) -> float:
    """The learning rate of ``step`` (0-based) in a run of ``plan`` steps.

    Linear warmup to ``lr`` over ``warmup_steps(config, plan)`` steps, then a decay from ``lr``
    at step 0 of the plan down to ``lr * min_lr_ratio`` at step ``plan`` (a cosine, or a straight
    line with ``decay="linear"``), taking over where it meets the warmup line.
    """
    warm = warmup_steps(config, plan)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = min(max(step / max(plan, 1), 0.0), 1.0)
    floor = config.lr * config.min_lr_ratio
    left = 1.0 - progress if config.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (config.lr - floor) * left


def eval_interval(config: TrainConfig, plan: int) -> int:
    """Steps between evaluations: ``eval_every`` if given, else the plan cut into 10."""
    if config.eval_every:
        return config.eval_every
    return max(1, plan // EVALUATIONS)


@dataclass
class Costs:
    """Seconds measured in calibration; what a time budget must pay for besides its steps."""

    step: float  # one optimizer step
    eval_token: float  # one validation token in evaluation
    save: float  # writing last/ (and best weights, about the same again at most)
    finish: float  # after the last step, besides the final evaluation: the plot and the summary
    sample: float = 0.0  # the text sampled at each evaluation (samples.jsonl)

    def evaluation(self, tokens: int) -> float:
        """One evaluation of ``tokens`` validation tokens, its sample included."""
        return tokens * self.eval_token + self.sample

    def periodic(self, tokens: int) -> float:
        """An evaluation during the run and the saves after it (best weights and last/)."""
        return self.evaluation(tokens) + 2 * self.save

    def final(self, val_tokens: int) -> float:
        """What follows the last step: the complete evaluation, the saves, the plot and the exit."""
        return self.periodic(val_tokens) + self.finish


def eval_token_cap(costs: Costs, budget_left: float, val_tokens: int) -> int | None:
    """Tokens per periodic evaluation so that 10 of them take at most 10% of the budget
    (None: the whole split fits)."""
    affordable = int(EVAL_SHARE * budget_left / EVALUATIONS / max(costs.eval_token, 1e-9))
    return None if affordable >= val_tokens else max(affordable, 1)


def plan_steps(config: TrainConfig, costs: Costs, budget_left: float, val_tokens: int,
               eval_tokens: int) -> int:
    """The most steps that fit ``budget_left`` seconds, with their evaluations, saves and the end.

    Periodic evaluations cost ``eval_tokens`` each and there are 10 of them (or one per
    ``eval_every`` steps); the final evaluation is complete. The plan aims at 98.5% of the budget.
    """
    final, periodic = costs.final(val_tokens), costs.periodic(eval_tokens)
    room = budget_left * BUDGET_TARGET - final
    if config.eval_every:
        steps = room / (costs.step + periodic / config.eval_every)
    else:
        steps = (room - EVALUATIONS * periodic) / costs.step
    return max(1, int(steps))
