"""The trainer: loss falls, stateful BPTT windows, exact evaluation, exact resume, signals,
--max-time, and the ``train``/``info`` commands.

Everything runs on CPU with tiny models (vocab ~20, hidden 16-32, windows of 16-32, a few
dozen steps). Only the signal tests start a ``python -m textrnn`` subprocess, because a signal
has to reach a real process; the other CLI tests run in-process through typer's CliRunner.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import sentence_corpus

from textrnn import checkpoint as ckpt
from textrnn import training
from textrnn.cli import app
from textrnn.config import ModelConfig, TrainConfig, count_parameters
from textrnn.data import TrainStreams, eval_windows, load_dataset, preprocess
from textrnn.errors import CheckpointError, InputError
from textrnn.evaluation import evaluate_ids
from textrnn.model import RNNLanguageModel
from textrnn.training import Interrupted, train

SENTENCES = ("the cat sat on the mat. ", "a dog ran to the log. ", "no hen is in the pen. ")


def _corpus(chars: int, seed: int = 0) -> str:
    """A text with ~20 symbols: short sentences in a random order (learnable, not one loop)."""
    return sentence_corpus(SENTENCES, chars, seed)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A preprocessed corpus: ~5,400 training tokens, 20 steps per epoch at batch 8 x 32."""
    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(_corpus(6000), encoding="utf-8")
    return preprocess([root / "corpus.txt"], root / "prepared", val_fraction=0.1)


def tiny_model(cell: str = "lstm", **overrides) -> ModelConfig:
    return ModelConfig(**{**dict(cell=cell, num_layers=1, hidden_size=32, embedding_dim=16, dropout=0.0), **overrides})


def tiny_train(**overrides) -> TrainConfig:
    settings = dict(seq_len=32, batch_size=8, lr=1e-2, warmup_steps=5, max_steps=20, eval_every=10, log_every=2,
                    seed=3, device="cpu", precision="fp32")
    return TrainConfig(**{**settings, **overrides})


def _metrics(run_dir: Path, kind: str) -> list[dict]:
    return [row for row in ckpt.read_metrics(run_dir) if row["kind"] == kind]


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "last" / "state.json").read_text())


runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the loss falls

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_overfitting_drives_loss_far_below_unigram_entropy(tmp_path, data_dir, cell):
    ids = load_dataset(data_dir).split("train")
    counts = np.bincount(ids)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats per token, ~2.6 here

    result = train([data_dir], tmp_path / cell, tiny_model(cell), tiny_train(max_steps=60, eval_every=60))

    first, last = _metrics(tmp_path / cell, "train")[0]["loss"], _metrics(tmp_path / cell, "train")[-1]["loss"]
    assert first > 0.8 * unigram_entropy  # it starts near chance...
    assert last < 0.5 * unigram_entropy, (cell, last, unigram_entropy)  # ...and learns the sentences
    assert result.best_val_loss < 0.5 * unigram_entropy
    assert result.step == 60 and result.stop_reason == "reached max_steps 60"


# ---------------------------------------------------------------- stateful batching

def test_window_t_plus_one_follows_window_t():
    ids = np.arange(1000, dtype=np.uint16)  # the value is the position, so continuity is visible
    streams = TrainStreams(ids, seq_len=7, streams=5, seed=1)
    for epoch in range(3):
        xs, ys = zip(*(streams.window(epoch, t) for t in range(streams.steps_per_epoch)))
        x, y = np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)  # (B, steps * L)
        assert x.shape == (5, streams.steps_per_epoch * 7) and x.dtype == np.int64
        start = streams.offset(epoch)
        for b in range(5):
            # one unbroken run of text per stream; the targets are the inputs shifted by one
            expected = np.arange(start + b * streams.stream_len, start + b * streams.stream_len + x.shape[1])
            np.testing.assert_array_equal(x[b], expected)
            np.testing.assert_array_equal(y[b], expected + 1)
        # streams do not overlap, and the last window stays inside the split
        assert x[:, -1].max() + 1 < len(ids)
        assert (x[1:, 0] > y[:-1, -1]).all()


def test_epochs_start_at_different_offsets():
    streams = TrainStreams(np.arange(5000, dtype=np.uint16), seq_len=32, streams=4, seed=7)
    offsets = [streams.offset(epoch) for epoch in range(8)]
    assert len(set(offsets)) > 1 and all(0 <= o < 32 for o in offsets)
    assert offsets == [streams.offset(epoch) for epoch in range(8)]  # a function of (seed, epoch): resumable
    assert offsets != [TrainStreams(streams.ids, 32, 4, seed=8).offset(epoch) for epoch in range(8)]
    # the number of steps does not depend on the offset
    for epoch in range(8):
        assert streams.window(epoch, streams.steps_per_epoch - 1)[0].shape == (4, 32)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_streams_equal_the_single_process_rows(world_size):
    ids = np.arange(3001, dtype=np.uint32)
    per_rank = 2
    whole = TrainStreams(ids, 16, per_rank * world_size, seed=5)
    ranks = [TrainStreams(ids, 16, per_rank, seed=5, total_streams=per_rank * world_size, first=per_rank * r)
             for r in range(world_size)]
    assert {r.steps_per_epoch for r in ranks} == {whole.steps_per_epoch}
    for epoch in range(2):
        for t in (0, 1, whole.steps_per_epoch - 1):
            x, y = whole.window(epoch, t)
            parts = [r.window(epoch, t) for r in ranks]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)


def test_too_short_split_is_a_clear_error():
    with pytest.raises(InputError, match="training split too short.*smaller --batch-size"):
        TrainStreams(np.arange(50, dtype=np.uint8), seq_len=16, streams=4, seed=0)


def test_training_loop_feeds_windows_in_order_and_resets_state_each_epoch(tmp_path, data_dir, monkeypatch):
    windows, states = [], []
    real_window, real_forward = TrainStreams.window, RNNLanguageModel.forward

    def window(self, epoch, step):
        windows.append((epoch, step))
        return real_window(self, epoch, step)

    def forward(self, ids, state=None):
        if self.training:
            states.append(float(sum(s.abs().sum() for s in state)))
        return real_forward(self, ids, state)

    monkeypatch.setattr(TrainStreams, "window", window)
    monkeypatch.setattr(RNNLanguageModel, "forward", forward)
    train([data_dir], tmp_path / "run", tiny_model(), tiny_train(max_steps=25, eval_every=100))
    per_epoch = TrainStreams(load_dataset(data_dir).split("train"), 32, 8, 3).steps_per_epoch
    assert per_epoch == 20
    assert windows == [(step // per_epoch, step % per_epoch) for step in range(25)]
    # a fresh state at the start of each epoch; the carried state everywhere else
    assert [i for i, total in enumerate(states) if total == 0] == [0, per_epoch]


# ---------------------------------------------------------------- evaluation counts every token once

@pytest.mark.parametrize("length", [2, 3, 37, 101, 1000])
@pytest.mark.parametrize("streams", [1, 3, 7, 64])
@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_eval_windows_score_every_target_once(length, streams, seq_len):
    ids = np.arange(length, dtype=np.int64)  # the value is the position
    windows = list(eval_windows(ids, seq_len, streams))
    scored = np.concatenate([y[y != -100] for _, y in windows])
    np.testing.assert_array_equal(np.sort(scored), np.arange(1, length))  # each target exactly once
    for x, y in windows:
        assert x.shape == y.shape and x.shape[1] <= seq_len
        mask = y != -100
        np.testing.assert_array_equal(y[mask], x[mask] + 1)  # each target follows its input
    # each row continues where it stopped in the window before (the carried state is right)
    rows = np.concatenate([x for x, _ in windows], axis=1)
    masks = np.concatenate([y != -100 for _, y in windows], axis=1)
    for row, mask in zip(rows, masks):
        kept = row[mask]
        assert (np.diff(kept) == 1).all()
        assert mask[: mask.sum()].all()  # padding only at the end of a row


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_windows_of_all_ranks_cover_the_split(world_size):
    ids = np.arange(523, dtype=np.int64)
    streams = 7
    scored = []
    for rank in range(world_size):
        for _, y in eval_windows(ids, 10, streams, owned=range(rank, streams, world_size)):
            scored.append(y[y != -100])
    np.testing.assert_array_equal(np.sort(np.concatenate(scored)), np.arange(1, 523))


@pytest.mark.parametrize("streams", [1, 4, 9])
@pytest.mark.parametrize("length", [97, 250])
def test_evaluate_ids_equals_scoring_each_column_in_one_pass(streams, length):
    torch.manual_seed(0)
    model = RNNLanguageModel(tiny_model("gru", vocab_size=11, num_layers=2, dropout=0.3))
    ids = np.random.default_rng(0).integers(0, 11, length).astype(np.uint8)
    loss_sum, count = evaluate_ids(model, ids, seq_len=8, streams=streams, device=torch.device("cpu"))
    assert count == length - 1
    assert model.training  # the mode is restored

    # reference: each column of targets scored in one forward pass from a fresh state
    targets = length - 1
    column = math.ceil(targets / streams)
    expected = 0.0
    model.eval()
    with torch.no_grad():
        for begin in range(0, targets, column):
            end = min(begin + column, targets)
            x = torch.from_numpy(ids[begin:end].astype(np.int64))[None]
            y = torch.from_numpy(ids[begin + 1:end + 1].astype(np.int64))
            logits, _ = model(x)
            expected += float(torch.nn.functional.cross_entropy(logits[0], y, reduction="sum"))
    assert loss_sum == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- exact resume

def _compare_runs(straight: Path, resumed: Path) -> None:
    a = ckpt.load_tensors(straight / "last" / "model.safetensors")
    b = ckpt.load_tensors(resumed / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    a_opt = ckpt.load_tensors(straight / "last" / "optimizer.safetensors")
    b_opt = ckpt.load_tensors(resumed / "last" / "optimizer.safetensors")
    for name in a_opt:
        torch.testing.assert_close(b_opt[name], a_opt[name], atol=1e-6, rtol=0, msg=name)
    best_a, best_b = ckpt.load_tensors(straight / "model.safetensors"), ckpt.load_tensors(resumed / "model.safetensors")
    for name in best_a:
        torch.testing.assert_close(best_b[name], best_a[name], atol=1e-6, rtol=0, msg=name)
    state_a, state_b = _state(straight), _state(resumed)
    for key in ("step", "epoch", "step_in_epoch", "bad_steps"):
        assert state_a[key] == state_b[key], key
    assert state_b["best_val_loss"] == pytest.approx(state_a["best_val_loss"], rel=1e-6)
    # the same metrics rows, step by step (times and speeds aside)
    for kind, keys in (("train", ("loss", "lr", "grad_norm")), ("eval", ("val_loss", "val_bpc"))):
        rows_a, rows_b = _metrics(straight, kind), _metrics(resumed, kind)
        assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], kind
        for row_a, row_b in zip(rows_a, rows_b):
            for key in keys:
                assert row_b[key] == pytest.approx(row_a[key], rel=1e-5, abs=1e-7), (kind, row_a["step"], key)


@pytest.mark.parametrize("cell, stop_at", [("lstm", 13), ("gru", 20)])
def test_interrupted_and_resumed_equals_straight(tmp_path, data_dir, cell, stop_at):
    """Dropout on, 2 layers, crossing an epoch boundary (20 steps per epoch); stops off the log grid."""
    model_config = tiny_model(cell, num_layers=2, dropout=0.3)
    config = tiny_train(max_steps=26, eval_every=8, log_every=3, warmup_steps=4)
    train([data_dir], tmp_path / "straight", model_config, config)

    with pytest.raises(Interrupted, match=f"step {stop_at}.*--resume"):
        train([data_dir], tmp_path / "resumed", model_config, config, should_stop=lambda step: step == stop_at)
    assert _state(tmp_path / "resumed")["step"] == stop_at
    result = train(resume=tmp_path / "resumed")
    assert result.step == 26
    _compare_runs(tmp_path / "straight", tmp_path / "resumed")


def test_weight_average_is_evaluated_saved_loaded_and_resumed_exactly(tmp_path, data_dir):
    """--ema: training itself is untouched (the same train rows and raw weights as without it), while
    evaluations, the best weights, ``--weights last`` and a resume all use the average."""
    model_config = tiny_model(num_layers=2, dropout=0.3)
    plain = train([data_dir], tmp_path / "plain", model_config, tiny_train(max_steps=26, eval_every=8))
    config = tiny_train(max_steps=26, eval_every=8, ema=0.9)
    averaged = train([data_dir], tmp_path / "straight", model_config, config)
    run = tmp_path / "straight"
    assert [r["loss"] for r in _metrics(run, "train")] == [r["loss"] for r in _metrics(tmp_path / "plain", "train")]
    raw, average = ckpt.load_tensors(run / "last" / "model.safetensors"), ckpt.load_tensors(run / "last" / "average.safetensors")
    assert raw.keys() == average.keys()
    for name, tensor in ckpt.load_tensors(tmp_path / "plain" / "last" / "model.safetensors").items():
        assert torch.equal(raw[name], tensor), name
    assert any(not torch.equal(raw[name], average[name]) for name in raw)
    assert averaged.best_val_loss != plain.best_val_loss

    # what the trainer scored last is the average, and that is what --weights last loads
    loaded = ckpt.load_run(run, weights="last")
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, average[name]), name
    val_ids = load_dataset(data_dir).split("val")
    loss_sum, count = evaluate_ids(loaded.model, val_ids, seq_len=32, streams=8, device=torch.device("cpu"),
                                   precision="fp32")
    assert loss_sum / count == pytest.approx(_metrics(run, "eval")[-1]["val_loss"], rel=1e-6)

    with pytest.raises(Interrupted):
        train([data_dir], tmp_path / "resumed", model_config, config, should_stop=lambda step: step == 13)
    train(resume=tmp_path / "resumed")
    _compare_runs(run, tmp_path / "resumed")
    resumed_average = ckpt.load_tensors(tmp_path / "resumed" / "last" / "average.safetensors")
    for name in average:
        torch.testing.assert_close(resumed_average[name], average[name], atol=1e-6, rtol=0, msg=name)


def test_resume_can_extend_a_finished_run(tmp_path, data_dir):
    """A finished run continues to a larger --max-steps (its schedule stretches, so not bit-exact)."""
    run_dir = tmp_path / "run"
    train([data_dir], run_dir, tiny_model(), tiny_train(max_steps=9, eval_every=4))
    result = train(resume=run_dir, resume_overrides={"max_steps": 16})
    assert result.step == 16 and _state(run_dir)["step"] == 16
    assert [r["step"] for r in _metrics(run_dir, "eval")] == [4, 8, 9, 12, 16]
    assert [r["step"] for r in _metrics(run_dir, "train")] == list(range(2, 17, 2))


def test_resume_rejects_changed_data(tmp_path):
    (tmp_path / "corpus.txt").write_text(_corpus(3000), encoding="utf-8")
    train([tmp_path / "corpus.txt"], tmp_path / "run", tiny_model(), tiny_train(max_steps=2, batch_size=4))
    train_bin = tmp_path / "run" / "data" / "train.bin"
    train_bin.write_bytes(bytes(reversed(train_bin.read_bytes())))
    with pytest.raises(CheckpointError, match="changed since the run started"):
        train(resume=tmp_path / "run", resume_overrides={"max_steps": 4})


# ---------------------------------------------------------------- signals (a real subprocess)

def _textrnn(*args: str, **popen) -> subprocess.Popen:
    """``python -m textrnn ARGS`` as a child process (stderr captured)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    env.pop("TEXTRNN_PROGRESS", None)
    return subprocess.Popen([sys.executable, "-m", "textrnn", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def _wait_for_progress(process: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training exited early ({process.returncode}): {process.stderr.read()}")
        rows = [r for r in ckpt.read_metrics(run_dir) if r.get("kind") == "train"]
        if rows and rows[-1]["step"] >= steps:
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail("training made no progress")


@pytest.fixture
def signal_config(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(_corpus(20_000, seed=1), encoding="utf-8")
    (tmp_path / "train.toml").write_text(
        "[model]\ncell = 'lstm'\nnum_layers = 2\nhidden_size = 24\nembedding_dim = 16\ndropout = 0.1\n"
        "[train]\nseq_len = 16\nbatch_size = 4\nlog_every = 2\neval_every = 100000\nmax_steps = 1000000\n"
        "device = 'cpu'\n", encoding="utf-8")
    return tmp_path


def test_sigint_and_sigterm_save_say_how_to_resume_and_exit_130(signal_config):
    """Both signals at once, in two runs side by side (one single-threaded process per core)."""
    runs = {sig: signal_config / f"run-{sig.name}" for sig in (signal.SIGINT, signal.SIGTERM)}
    processes = {sig: _textrnn("train", str(signal_config / "corpus.txt"), "--out", str(run_dir),
                               "--config", str(signal_config / "train.toml")) for sig, run_dir in runs.items()}
    try:
        for sig, process in processes.items():
            _wait_for_progress(process, runs[sig], steps=4)
            process.send_signal(sig)
        outputs = {sig: process.communicate(timeout=60) for sig, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    for sig, (stdout, stderr) in outputs.items():
        run_dir = runs[sig]
        assert processes[sig].returncode == 130, (sig.name, stderr)
        assert "Traceback" not in stderr and stdout == ""
        resume_lines = [line for line in stderr.splitlines() if "resume" in line]
        assert len(resume_lines) == 1 and f"textrnn train --resume {run_dir}" in resume_lines[0], stderr
        saved = _state(run_dir)["step"]
        assert saved >= 4 and f"step {saved}" in resume_lines[0]
        assert ckpt.load_tensors(run_dir / "last" / "model.safetensors")

    # --resume continues the SIGINT run to --max-steps (in-process: a third interpreter start is slow)
    run_dir = runs[signal.SIGINT]
    target = _state(run_dir)["step"] + 6
    resumed = _invoke("train", "--resume", run_dir, "--max-steps", str(target))
    assert resumed.exit_code == 0, resumed.output
    assert _state(run_dir)["step"] == target
    assert f"after {target} steps" in resumed.stderr
    rows = ckpt.read_metrics(run_dir)
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] > target - 2  # logged every 2 steps, none twice
    # the interrupted run scored and kept its weights (it had no evaluation yet); the resumed one ends with one
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [target - 6, target]


def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(training.os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN under nohup or a background job
    with training._StopSignal() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop._handle(signal.SIGTERM, None)
        assert stop.received == "SIGTERM" and exits == []  # the first asks for a stop at the next step
        stop._handle(signal.SIGINT, None)
        assert exits == [130]  # the second leaves at once; the last complete checkpoint stays
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored


# ---------------------------------------------------------------- the train and info commands

def test_train_with_toml_config_flags_override_and_info(tmp_path, data_dir):
    config = _toml(tmp_path / "settings.toml",
                   "preset = 'tiny'\n"
                   "[model]\ncell = 'gru'\nhidden_size = 16\nembedding_dim = 8\n"
                   "[train]\nseq_len = 32\nbatch_size = 4\nmax_steps = 4\neval_every = 2\nlog_every = 1\n"
                   "max_time = '5m'\ndevice = 'cpu'\n")
    result = _invoke("train", data_dir, "--out", tmp_path / "run", "--config", config, "--seq-len", "16",
                     "--hidden", "20")
    assert result.exit_code == 0, result.output
    assert "done: best val bpc" in result.stderr and str(tmp_path / "run") in result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["format"] == "textrnn-run" and saved["version"] == 1
    assert saved["model"]["cell"] == "gru" and saved["model"]["num_layers"] == 1  # preset tiny, file's cell
    assert saved["model"]["hidden_size"] == 20 and saved["model"]["embedding_dim"] == 8  # flag beats file
    assert saved["train"]["seq_len"] == 16 and saved["train"]["batch_size"] == 4 and saved["train"]["max_time"] == 300
    assert _state(tmp_path / "run")["step"] == 4

    info = _invoke("info", tmp_path / "run")
    assert info.exit_code == 0, info.output
    model = ModelConfig.from_dict(saved["model"])
    built = RNNLanguageModel(model)
    assert f"{sum(p.numel() for p in built.parameters()):,}" in info.stdout
    assert f"{count_parameters(model):,}" in info.stdout
    assert "gru 1x20" in info.stdout and "seq_len=16" in info.stdout and "batch_size=4" in info.stdout
    best = min(_metrics(tmp_path / "run", "eval"), key=lambda r: r["val_loss"])
    assert f"{best['val_bpc']:.4f} bpc" in info.stdout and "step 4" in info.stdout


@pytest.mark.parametrize("text, message", [
    ("[train]\nbatchsize = 4\n", "unknown setting(s) batchsize"),
    ("learning_rate = 0.1\n", "unknown setting(s) learning_rate"),
    ("[model]\nhidden_size = 'big'\n", "hidden_size has the wrong type"),
    ("[train]\nseq_len = 1.5\n", "seq_len has the wrong type"),
    ("[train]\ntie_weights = 1\n", "tie_weights has the wrong type"),
    ("[data]\nval_fraction = 'tenth'\n", "val_fraction has the wrong type"),
    ("[data]\nvocab_size = 'many'\n", "vocab_size has the wrong type"),
    ("preset = 'huge'\n", "unknown preset 'huge'"),
    ("[train]\nmax_time = 'forever'\n", "cannot read duration"),
    ("[train\n", "malformed TOML"),
])
def test_train_config_file_errors_exit_2_with_one_line(tmp_path, data_dir, text, message):
    config = _toml(tmp_path / "bad.toml", text)
    result = _invoke("train", data_dir, "--out", tmp_path / "run", "--config", config, "--max-steps", "1")
    assert result.exit_code == 2, result.output
    assert message in _one_error_line(result)
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_resume_refuses_model_flags(tmp_path):
    result = _invoke("train", "--resume", tmp_path, "--hidden", "64")
    assert result.exit_code == 2
    assert "only --device, --epochs, --eval-every, --eval-tokens, --max-steps" in _one_error_line(result)


def test_train_without_input_is_usage_error():
    result = _invoke("train")
    assert result.exit_code == 2
    assert "missing INPUT" in _one_error_line(result)


def test_train_help_shows_preset_parameter_counts():
    result = _invoke("train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name in ("tiny", "small", "medium", "large"):
        assert f"{name} " in text
    assert "M," in text and "--max-time" in text and "--resume" in text


@pytest.mark.parametrize("problem", ["bf16", "too short"])
def test_a_run_that_cannot_start_leaves_no_run_directory(tmp_path, data_dir, problem):
    from textrnn.runtime import _cpu_bf16_rnn_works

    if problem == "bf16" and _cpu_bf16_rnn_works():
        pytest.skip("this CPU trains bf16 recurrent layers")
    flags = ["--precision", "bf16"] if problem == "bf16" else ["--batch-size", "512"]
    common = ["--layers", "1", "--hidden", "16", "--embed", "8", "--max-steps", "1", "--device", "cpu"]
    result = _invoke("train", data_dir, "--out", tmp_path / "run", *flags, *common)
    assert result.exit_code == 2
    assert ("bf16 is not supported" if problem == "bf16" else "training split too short") in _one_error_line(result)
    assert not (tmp_path / "run").exists()  # so the same --out works once the setting is fixed
    assert _invoke("train", data_dir, "--out", tmp_path / "run", *common).exit_code == 0
