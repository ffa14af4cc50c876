"""The training budget: a time budget becomes a step plan, and the run keeps its word.

A time-budgeted run equals ``--max-steps P`` with its recorded plan, bit for bit; interrupted and
resumed it equals the straight run; the whole process ends within its budget, final evaluation
included; every run evaluates at least 10 times; a run stopped before its first evaluation can
be sampled from; the learning-rate schedule is pinned; ``--threads`` is honoured.
Tiny models on CPU, fp32, one thread.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import invoke, sentence_corpus
from textrnn import budget
from textrnn import checkpoint as ckpt
from textrnn import training
from textrnn.config import ModelConfig, TrainConfig
from textrnn.data import preprocess
from textrnn.sampling import Sampler
from textrnn.schedule import Costs, eval_interval, learning_rate, plan_steps, warmup_steps
from textrnn.training import Interrupted, train

WORDS = ("the cat sat on the mat. ", "a dog ran to the log. ", "no hen is in the pen. ", "we met at ten. ")


def _corpus(chars: int) -> str:
    return sentence_corpus(WORDS, chars)


@pytest.fixture(scope="module", autouse=True)
def warm_process():
    """One-time costs of a process, paid before the timed runs: importing matplotlib, and the first
    optimizer, which imports torch._dynamo (about 2 s). They would leave little of a 5 s budget."""
    with contextlib.suppress(ImportError):
        import matplotlib.pyplot  # noqa: F401
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("budget")
    (root / "corpus.txt").write_text(_corpus(12_000), encoding="utf-8")
    return preprocess([root / "corpus.txt"], root / "prepared", val_fraction=0.1)


def tiny_model(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(cell="lstm", num_layers=2, hidden_size=24, embedding_dim=16, dropout=0.2),
                          **overrides})


def tiny_train(**overrides) -> TrainConfig:
    settings = dict(seq_len=16, batch_size=8, lr=1e-2, warmup_steps=10, log_every=3, seed=5, device="cpu",
                    precision="fp32", threads=1)
    return TrainConfig(**{**settings, **overrides})


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "last" / "state.json").read_text())


def _rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in ckpt.read_metrics(run_dir) if r["kind"] == kind]


def _assert_same_training(a: Path, b: Path) -> None:
    """Bit for bit: the last weights and optimizer state, the best weights, every training row, and
    the steps evaluated. (A time budget may score a prefix of a large validation split, and a run
    stopped before its first evaluation scores its weights once more: the rows' losses may differ.)"""
    for name in ("last/model.safetensors", "last/optimizer.safetensors", "model.safetensors"):
        ta, tb = ckpt.load_tensors(a / name), ckpt.load_tensors(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in _rows(a, "train")] == [[r[k] for k in keys] for r in _rows(b, "train")]
    assert {r["step"] for r in _rows(a, "eval")} <= {r["step"] for r in _rows(b, "eval")} | {_state(a)["step"]}


@pytest.fixture
def steady_machine(monkeypatch):
    """A run that completes its calibrated plan. Replanning and the stop short of the budget react
    to the machine's speed, which a shared test machine cannot hold still, so they are switched
    off where bit-exactness is the point (the next tests check them)."""
    monkeypatch.setattr(budget, "REPLAN_TOLERANCE", math.inf)
    monkeypatch.setattr(training, "over_budget", lambda *args: False)


# ---------------------------------------------------------------- a time budget is a step plan

def test_time_budget_equals_max_steps_of_its_plan(tmp_path, data_dir, steady_machine):
    timed = train([data_dir], tmp_path / "timed", tiny_model(), tiny_train(max_time=6.0))
    plan = _state(tmp_path / "timed")["plan"]
    assert timed.step == plan > 5 and timed.stop_reason.startswith("completed the")
    stepped = train([data_dir], tmp_path / "stepped", tiny_model(), tiny_train(max_steps=plan))
    assert stepped.step == plan
    _assert_same_training(tmp_path / "timed", tmp_path / "stepped")


def test_time_budget_interrupted_and_resumed_equals_straight(tmp_path, data_dir, steady_machine):
    """Dropout on; stopped between evaluations; the resumed run keeps the recorded plan."""
    with pytest.raises(Interrupted):
        train([data_dir], tmp_path / "resumed", tiny_model(), tiny_train(max_time=6.0),
              should_stop=lambda step: step == 17)
    state = _state(tmp_path / "resumed")
    assert state["step"] == 17 and state["status"] == "interrupted"
    result = train(resume=tmp_path / "resumed")
    assert result.step == state["plan"]
    train([data_dir], tmp_path / "straight", tiny_model(), tiny_train(max_steps=state["plan"]))
    _assert_same_training(tmp_path / "straight", tmp_path / "resumed")


def test_a_slower_machine_shortens_the_plan_and_keeps_the_budget(tmp_path, data_dir, monkeypatch):
    """Training steps that take three times longer once the plan is made: the plan shrinks at the
    evaluations, the schedule still decays to its end, and the run ends inside its budget."""
    real_loss, real_plan, planned = training._loss, training.make_plan, {}

    def plan_then_slow_down(state, config, costs, *args, **kwargs):
        real_plan(state, config, costs, *args, **kwargs)
        planned["step"] = costs.step

    def slow_loss(logits, targets):
        if planned and torch.is_grad_enabled():  # training steps only, after calibration
            time.sleep(2 * planned["step"])
        return real_loss(logits, targets)

    monkeypatch.setattr(training, "make_plan", plan_then_slow_down)
    monkeypatch.setattr(training, "_loss", slow_loss)
    for module in (training, budget):  # a plot takes a good part of a 5 s budget: none here
        monkeypatch.setattr(module, "plot_losses", lambda *args: None)
    budget_seconds = 5.0
    start = time.perf_counter()
    result = train([data_dir], tmp_path / "run", tiny_model(), tiny_train(max_time=budget_seconds, log_every=1))
    wall = time.perf_counter() - start
    state = _state(tmp_path / "run")
    assert wall < budget_seconds + 1.0, wall
    assert result.step >= 20, state  # enough steps for the schedule to show its shape
    assert state["plan"] - result.step <= max(3, state["plan"] // 10)  # replanned to what the time allowed
    last = _rows(tmp_path / "run", "train")[-1]
    assert last["step"] == result.step
    assert last["lr"] < 0.1 * 1e-2  # the cosine reached (nearly) its end


def test_budget_is_wall_time_for_the_whole_process(tmp_path, data_dir):
    """``time textrnn train --max-time 10s``: the process, imports, final evaluation and save
    included, ends within the budget plus 5 s, having used most of it."""
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nnum_layers = 1\nhidden_size = 24\nembedding_dim = 16\n"
                      "[train]\nseq_len = 16\nbatch_size = 8\nthreads = 1\nprecision = 'fp32'\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "textrnn", "train", str(data_dir), "--out", str(tmp_path / "run"),
                           "--config", str(config), "--max-time", "10s"], capture_output=True, text=True, env=env,
                          timeout=60)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert 10.0 * 0.7 < wall < 10.0 + 5.0, (wall, done.stderr)
    state = _state(tmp_path / "run")
    assert state["status"] == "finished" and state["elapsed"] <= 10.0 + 5.0  # the promise: +5% or 5 s
    assert len(_rows(tmp_path / "run", "eval")) >= 10
    assert "done:" in done.stderr and "step" in done.stderr  # plain progress lines, not a bar
    assert sum("val loss" in line for line in done.stderr.splitlines()) >= 10


# ---------------------------------------------------------------- evaluations and what a stop leaves

def test_a_default_run_evaluates_ten_times_spread_over_its_plan(tmp_path, data_dir):
    train([data_dir], tmp_path / "run", tiny_model(), tiny_train(max_steps=47))
    assert [r["step"] for r in _rows(tmp_path / "run", "eval")] == [4 * k for k in range(1, 12)] + [47]


def test_a_run_stopped_before_its_first_evaluation_can_be_sampled(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        train([data_dir], run_dir, tiny_model(), tiny_train(max_steps=1000), should_stop=lambda step: step == 3)
    assert [r["step"] for r in _rows(run_dir, "eval")] == [3]  # scored and kept as the best so far
    assert Sampler.from_checkpoint(run_dir, device="cpu").generate("the ", length=20, seed=1)
    assert invoke("evaluate", run_dir, data_dir.parent / "corpus.txt").code == 0
    shown = invoke("info", run_dir)
    assert shown.code == 0 and "interrupted at step 3" in shown.stdout, shown.stdout
    (run_dir / "model.safetensors").unlink()  # as after a kill -9 before the first evaluation
    generated = invoke("generate", "-c", run_dir, "--prompt", "the ", "--length", "5")
    assert generated.code == 0 and "no evaluated weights yet" in generated.stderr, generated.stderr


def test_sigterm_before_the_first_evaluation_leaves_a_usable_run(tmp_path, data_dir):
    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nnum_layers = 1\nhidden_size = 24\nembedding_dim = 16\n[train]\nseq_len = 16\n"
                      "batch_size = 8\nlog_every = 1\nmax_steps = 100000\nthreads = 1\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "textrnn", "train", str(data_dir), "--out",
                                str(tmp_path / "run"), "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not _rows(tmp_path / "run", "train") and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert not any(line.startswith("error:") for line in stderr.splitlines()), stderr
    assert "textrnn train --resume" in stderr
    assert invoke("generate", "-c", tmp_path / "run", "--length", "10", "--seed", "1").code == 0


def test_a_bad_last_step_still_evaluates_and_saves(tmp_path, data_dir, monkeypatch):
    real_loss, calls = training._loss, [0]

    def loss(logits, targets):
        calls[0] += 1
        value = real_loss(logits, targets)
        return value * float("nan") if calls[0] == 12 else value

    monkeypatch.setattr(training, "_loss", loss)
    result = train([data_dir], tmp_path / "run", tiny_model(), tiny_train(max_steps=12, eval_every=5))
    assert result.step == 12
    assert [r["step"] for r in _rows(tmp_path / "run", "eval")] == [5, 10, 12]
    assert _state(tmp_path / "run")["status"] == "finished"


def test_resuming_a_finished_run_adds_no_rows(tmp_path, data_dir):
    train([data_dir], tmp_path / "run", tiny_model(), tiny_train(max_steps=13))
    before = ckpt.read_metrics(tmp_path / "run")
    result = train(resume=tmp_path / "run")
    assert result.step == 13 and ckpt.read_metrics(tmp_path / "run") == before


def test_info_reports_the_run_and_verifies_its_data(tmp_path, data_dir):
    (tmp_path / "corpus.txt").write_text(_corpus(4000), encoding="utf-8")
    train([tmp_path / "corpus.txt"], tmp_path / "run", tiny_model(), tiny_train(max_steps=6))
    shown = invoke("info", tmp_path / "run", "--verify")
    assert shown.code == 0, shown.stderr
    assert "step 6 of 6 planned" in shown.stdout and "finished: reached max_steps 6" in shown.stdout
    assert "1 thread" in shown.stdout and "train.bin, val.bin match" in shown.stdout
    val_bin = tmp_path / "run" / "data" / "val.bin"
    val_bin.write_bytes(val_bin.read_bytes()[::-1])
    broken = invoke("info", tmp_path / "run", "--verify")
    assert broken.code == 2 and "val.bin: sha256 mismatch" in broken.stderr


# ---------------------------------------------------------------- the schedule, pinned

def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{**dict(lr=1e-3, warmup_steps=100, min_lr_ratio=0.0), **overrides})


def test_warmup_is_linear_and_at_most_five_percent_of_the_plan():
    config = _config()
    assert warmup_steps(config, 10_000) == 100 and warmup_steps(config, 1_000) == 50
    assert learning_rate(config, 0, 10_000) == pytest.approx(1e-5)
    assert learning_rate(config, 49, 10_000) == pytest.approx(5e-4)
    assert learning_rate(config, 0, 1_000) == pytest.approx(2e-5)
    assert learning_rate(config, 49, 1_000) == pytest.approx(1e-3 * math.cos(math.pi * 0.049) / 2 + 5e-4, rel=0.3)
    assert warmup_steps(_config(warmup_steps=0), 1000) == 0


def test_cosine_shape_and_end_value_follow_the_plan():
    config = _config(min_lr_ratio=0.1)
    floor = 1e-4
    for plan in (400, 10_000):
        assert learning_rate(config, plan // 2, plan) == pytest.approx(floor + (1e-3 - floor) / 2)
        assert learning_rate(config, plan // 4, plan) == pytest.approx(floor + (1e-3 - floor) * (1 + math.cos(math.pi / 4)) / 2)
        assert learning_rate(config, plan, plan) == pytest.approx(floor)
    assert learning_rate(_config(), 5_000, 10_000) == pytest.approx(5e-4)  # the same step, another plan
    assert learning_rate(_config(), 5_000, 20_000) == pytest.approx(5e-4 * (1 + math.cos(math.pi / 4)))


def test_linear_decay_is_a_straight_line_to_its_floor():
    config = _config(decay="linear", min_lr_ratio=0.1)
    for plan in (400, 10_000):
        assert learning_rate(config, plan // 4, plan) == pytest.approx(1e-4 + 9e-4 * 0.75)
        assert learning_rate(config, plan // 2, plan) == pytest.approx(1e-4 + 9e-4 * 0.5)
        assert learning_rate(config, plan, plan) == pytest.approx(1e-4)


def test_the_trainer_follows_the_schedule_step_by_step(tmp_path, data_dir):
    """The logged rates are the formula's, computed here independently: a constant rate fails."""
    config = tiny_train(max_steps=30, warmup_steps=10, log_every=1, lr=0.02)
    train([data_dir], tmp_path / "run", tiny_model(), config)
    rates = {r["step"]: r["lr"] for r in _rows(tmp_path / "run", "train")}
    warm = 1  # min(10, 5% of 30)
    for step, lr in rates.items():
        index = step - 1
        expected = 0.02 * (index + 1) / warm if index < warm else 0.01 * (1 + math.cos(math.pi * index / 30))
        assert lr == pytest.approx(expected), step
    assert rates[30] < 0.001 < rates[2]


def test_a_plan_fits_its_budget():
    config = _config()
    costs = Costs(step=0.1, eval_token=1e-5, save=0.2, finish=1.0)
    plan = plan_steps(config, costs, budget_left=600.0, val_tokens=100_000, eval_tokens=100_000)
    spent = plan * 0.1 + 10 * (1.0 + 0.4) + (1.0 + 0.4 + 1.0)
    assert 0.97 * 600 < spent <= 600
    assert eval_interval(config, plan) == plan // 10 and eval_interval(_config(eval_every=7), plan) == 7


# ---------------------------------------------------------------- threads

def test_threads_are_honoured(tmp_path, data_dir, monkeypatch):
    seen: list[int] = []
    train([data_dir], tmp_path / "a", tiny_model(), tiny_train(max_steps=3, threads=2),
          should_stop=lambda step: seen.append(torch.get_num_threads()) and False)
    assert set(seen) == {2} and _state(tmp_path / "a")["threads"] == 2
    assert torch.get_num_threads() == 1  # given back afterwards

    monkeypatch.setenv("TEXTRNN_THREADS", "2")
    seen.clear()
    train([data_dir], tmp_path / "b", tiny_model(), tiny_train(max_steps=3, threads=None),
          should_stop=lambda step: seen.append(torch.get_num_threads()) and False)
    assert set(seen) == {2}
    monkeypatch.setenv("TEXTRNN_THREADS", "many")
    bad = invoke("train", data_dir, "--out", tmp_path / "c", "--max-steps", "2")
    assert bad.code == 2 and "TEXTRNN_THREADS" in bad.stderr
    shown = invoke("train", "--help")
    assert "--threads" in shown.stdout and "[default: 64]" in shown.stdout


def test_the_default_model_is_sized_for_the_budget(data_dir, tmp_path):
    from textrnn.config import AUTO_WIDE_FROM, preset

    small = preset("small")
    assert preset("auto") == small == preset("auto", AUTO_WIDE_FROM - 1)  # no budget, or a short one
    wide = preset("auto", AUTO_WIDE_FROM)
    assert (wide.num_layers, wide.hidden_size, wide.dropout) == (2, 384, 0.15)

    def trained(name: str, *flags) -> dict:
        result = invoke("train", data_dir, "--out", tmp_path / name, "--max-steps", "2", "--eval-tokens", "200",
                        "--threads", "1", *flags)
        assert result.code == 0, result.stderr
        return json.loads((tmp_path / name / "config.json").read_text())["model"]

    assert trained("short", "--max-time", "5m")["hidden_size"] == 256
    long = trained("long", "--max-time", "20m")
    assert (long["hidden_size"], long["dropout"]) == (384, 0.15)
    assert trained("named", "--max-time", "20m", "--preset", "small")["hidden_size"] == 256  # a named preset wins
    assert trained("shaped", "--max-time", "20m", "--hidden", "320")["hidden_size"] == 320  # and a shape flag
    # the Python API without a model config follows the same rule
    result = train([data_dir], tmp_path / "api", None, TrainConfig(max_time=AUTO_WIDE_FROM, max_steps=2, threads=1))
    assert json.loads((result.run_dir / "config.json").read_text())["model"]["hidden_size"] == 384
    # fine-tuning keeps the base's model: auto never contradicts it
    assert trained("tuned", "--init-from", tmp_path / "short", "--preset", "auto")["hidden_size"] == 256


# ---------------------------------------------------------------- replaying a time-budgeted run

def test_replay_after_a_replan_equals_the_run_bit_for_bit(tmp_path, data_dir, monkeypatch):
    """A time budget replanned because its steps slowed down after the plan; ``train --replay``
    follows the recorded plans at full speed and computes the same run: every loss, rate and
    weight, and the same evaluations."""
    real_loss, real_plan, planned = training._loss, training.make_plan, {}

    def plan_then_slow_down(state, config, costs, *args, **kwargs):
        real_plan(state, config, costs, *args, **kwargs)
        planned["step"] = costs.step

    def slow_loss(logits, targets):
        if planned and torch.is_grad_enabled():
            time.sleep(2 * planned["step"])
        return real_loss(logits, targets)

    for module in (training, budget):
        monkeypatch.setattr(module, "plot_losses", lambda *args: None)
    with monkeypatch.context() as slow:
        slow.setattr(training, "make_plan", plan_then_slow_down)
        slow.setattr(training, "_loss", slow_loss)
        original = train([data_dir], tmp_path / "run", tiny_model(), tiny_train(max_time=5.0, log_every=1))
    plans = _state(tmp_path / "run")["plans"]
    assert [p["kind"] for p in plans][:2] == ["plan", "replan"] and plans[1]["plan"] < plans[0]["plan"], plans

    replayed = train(replay=tmp_path / "run")
    assert replayed.run_dir == tmp_path / "run-replay"
    assert (replayed.step, replayed.stop_reason) == (original.step, original.stop_reason)
    _assert_same_training(tmp_path / "run", tmp_path / "run-replay")
    keys = ("step", "val_loss", "val_tokens")
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "run", "eval")] == \
        [[r[k] for k in keys] for r in _rows(tmp_path / "run-replay", "eval")]
    assert _state(tmp_path / "run-replay")["plans"] == plans


def test_replay_refuses_what_it_cannot_follow(tmp_path, data_dir):
    with pytest.raises(Interrupted):
        train([data_dir], tmp_path / "stopped", tiny_model(), tiny_train(max_steps=12),
              should_stop=lambda step: step == 5)
    code, _, err = invoke("train", "--replay", tmp_path / "stopped")
    assert code == 2 and "stopped" in err and "not finished" in err and "Traceback" not in err
    train([data_dir], tmp_path / "done", tiny_model(), tiny_train(max_steps=6))
    code, _, err = invoke("train", "--replay", tmp_path / "done", "--dropout", "0.3")
    assert code == 2 and "--replay" in err and "alone" in err
    code, _, _ = invoke("train", "--replay", tmp_path / "done", "--out", tmp_path / "again")
    assert code == 0 and (tmp_path / "again" / "model.safetensors").is_file()
    code, _, err = invoke("train", "--replay", tmp_path / "done", "--out", tmp_path / "again")
    assert code == 2 and "already holds a run" in err


def test_auto_fitted_to_a_time_budget_then_replayed(tmp_path):
    """Under a time budget the epochs are known after calibration; when auto turns DropConnect on,
    the steps are timed and planned again. The run records one plan, and ``--replay`` follows it."""
    from textrnn.config import AUTO_FITTED

    # 180 training tokens: even 60 steps of 8 x 16 read them 40 times, however busy the machine
    (tmp_path / "short.txt").write_text(_corpus(200), encoding="utf-8")
    train([tmp_path / "short.txt"], tmp_path / "run", tiny_model(dropout=0.0), tiny_train(max_time=5.0),
          fit=AUTO_FITTED)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["auto"]["planned_epochs"] > 39, config["auto"]
    assert (config["model"]["dropout"], config["model"]["weight_drop"]) == (0.35, 0.2)
    assert [p["kind"] for p in _state(tmp_path / "run")["plans"]].count("plan") == 1
    train(replay=tmp_path / "run")
    _assert_same_training(tmp_path / "run", tmp_path / "run-replay")
