"""Injected faults: signals, kills mid-write, full disks, NaNs, a runaway learning rate, changed
data, a closed stdout and a corpus larger than memory. Each is survived with nothing lost.

Signals, kills and write errors hit real ``python`` processes: ``_CHILD`` runs the real CLI after
wrapping a few functions to slow a step, to hang inside a checkpoint write, or to fail one with a
real ``OSError`` (ENOSPC from fsync, or EFBIG from the kernel under ``RLIMIT_FSIZE``), each armed
only after the run has saved a first checkpoint. The test then signals or kills it and checks
what is on disk. Resuming, NaN injection (through ``training._loss``, which exists for this) and
the learning-rate fault run in this process, where they are quick.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import invoke
import torch

from textrnn import checkpoint as ckpt
from textrnn import training
from textrnn.config import ModelConfig, TrainConfig
from textrnn.errors import TrainingError

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--layers", "1", "--hidden", "16", "--embed", "8", "--dropout", "0", "--batch-size", "4",
              "--seq-len", "16", "--warmup", "0", "--device", "cpu"]
MAX_STEPS = 40  # about 250 steps make an epoch of the corpus below, so every stop here is mid-epoch
RUN_FLAGS = [*TINY_MODEL, "--max-steps", str(MAX_STEPS), "--eval-every", "10"]


def corpus_text() -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex jolly quacks".split()
    return "".join(" ".join(words[(n * 7 + k * 3) % len(words)] for k in range(9)) + ".\n" for n in range(400))


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def error_line(stderr: str) -> str:
    """The one ``error:`` line, last on stderr (progress lines may come before it); no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], f"expected one final error line:\n{stderr}"
    return errors[0]


def saved_step(run: Path) -> int:
    return json.loads((ckpt.last_dir(run) / ckpt.STATE_FILE).read_text(encoding="utf-8"))["step"]


def assert_every_saved_tensor_finite(run: Path) -> None:
    files = [p for p in run.rglob("*.safetensors") if not any(part.startswith(".tmp-") for part in p.parts)]
    assert files
    for path in files:
        for name, tensor in ckpt.load_tensors(path).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{path}: {name} holds NaN or inf"


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(ckpt.TMP_PREFIX + "*")]


def resume_to_the_end(run: Path) -> None:
    code, _, stderr = invoke("train", "--resume", run)
    assert code == 0, stderr
    assert saved_step(run) == MAX_STEPS
    assert temporaries(run) == [], "resume did not clear what the killed process left"


_FAULTS = r"""
# The real textrnn CLI with faults injected; the FAULT* variables say which and when.
import errno, os, resource, signal, sys, time
from pathlib import Path

from textrnn import training
from textrnn.cli import app

marker = Path(os.environ["FAULT_MARKER"])  # touched when the fault is reached (.step: when the marked step is)
fault = os.environ.get("FAULT", "")
step_delay = float(os.environ.get("FAULT_STEP_DELAY", "0"))
mark_step = int(os.environ.get("FAULT_MARK_STEP", "0"))
saves = calls = 0

real_loss, real_save_last, real_fsync, real_replace = training._loss, training.save_last, os.fsync, os.replace


def loss(logits, targets):  # from the marked step on, slow steps: a signal then lands mid-run
    global calls
    calls += 1
    if calls == mark_step:
        marker.with_suffix(".step").touch()
    if calls >= mark_step:
        time.sleep(step_delay)
    return real_loss(logits, targets)


def save_last(*args, **kwargs):  # faults are armed once the first checkpoint is complete
    global saves
    real_save_last(*args, **kwargs)
    saves += 1
    if fault == "file-size-limit" and saves == 1:  # the kernel now fails any write past 4 KiB (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def fsync(fd):
    if saves and fault == "hang-in-fsync":
        marker.touch()
        time.sleep(600)
    real_fsync(fd)


def replace(source, destination):
    if saves and fault == "hang-between-renames" and Path(source).name.startswith(".tmp-last."):
        marker.touch()  # last/ has just been renamed to last.old/; the new one is not in place yet
        time.sleep(600)
    real_replace(source, destination)


training._loss, training.save_last, os.fsync, os.replace = loss, save_last, fsync, replace
app(sys.argv[1:], prog_name="textrnn")
"""

_ZYGOTE = r"""
# Imports torch and textrnn once, then forks one process per request (a JSON line on stdin) that
# sets up its file descriptors and runs the request's code; each exit status (or -signal) goes to
# the file the request names. No torch op runs here before a fork.
import json, os, signal, sys, traceback

import matplotlib.pyplot  # noqa: F401 - the slow imports, shared by every child
import torch  # noqa: F401
import textrnn.cli, textrnn.evaluation, textrnn.sampling, textrnn.training  # noqa: F401

status_files = {}


def reap(signum, frame):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        path = status_files.pop(pid)
        with open(path + ".part", "w") as handle:
            handle.write(str(code))
        os.rename(path + ".part", path)


def become_child(request):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        if request["stdout"] == "closed":  # as when python starts with file descriptor 1 closed
            os.close(1)
            sys.stdout = None
        else:
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT, 0o644), 1)
        os.environ.update(request["env"])
        sys.argv = ["textrnn", *request["args"]]
        exec(compile(request["code"], "<child>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):  # as the interpreter does at exit
        try:
            if stream is not None:
                stream.flush()
        except Exception as exc:
            print(f"Exception ignored at exit: {exc!r}", file=sys.__stderr__)
            code = 120
    os._exit(code)


signal.signal(signal.SIGCHLD, reap)
for line in sys.stdin:
    request = json.loads(line)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # note the child before it can be reaped
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        become_child(request)
    status_files[pid] = request["status"]
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    print(pid, flush=True)
"""


class Child:
    """A process forked by the zygote: signal it, wait for a file it makes, wait for its exit."""

    def __init__(self, pid: int, directory: Path):
        self.pid, self.directory = pid, directory
        self.marker, self.status_path = directory / "fault.marker", directory / "exit.status"

    @property
    def stderr(self) -> str:
        return (self.directory / "stderr.txt").read_text(encoding="utf-8", errors="replace")

    @property
    def stdout(self) -> str:
        return (self.directory / "stdout.txt").read_text(encoding="utf-8", errors="replace")

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_for(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.status_path.exists():
                raise AssertionError(f"the child exited ({self.status_path.read_text()}) before {path.name}:\n"
                                     f"{self.stderr}")
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"no {path.name} after {timeout}s:\n{self.stderr}")
            time.sleep(0.01)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while not self.status_path.exists():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"the child did not exit within {timeout}s:\n{self.stderr}")
            time.sleep(0.01)
        return int(self.status_path.read_text())


class Zygote:
    """One python process that has imported torch and textrnn and forks a fresh one per child.

    Every child is a real process running the real CLI, signalled and killed for real; forking
    spares each the seconds of importing torch, which on a small shared machine dominate.
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        env.pop("TEXTRNN_PROGRESS", None)
        self.process = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True)
        self.children: list[Child] = []

    def spawn(self, directory: Path, *args: str | os.PathLike, code: str = _FAULTS, stdout: str | None = None,
              fault: str = "", step_delay: float = 0.0, mark_step: int = 0) -> Child:
        directory.mkdir(parents=True, exist_ok=True)
        env = {"FAULT": fault, "FAULT_MARKER": str(directory / "fault.marker"), "FAULT_STEP_DELAY": str(step_delay),
               "FAULT_MARK_STEP": str(mark_step)}
        request = {"args": [os.fspath(a) for a in args], "code": code, "env": env,
                   "stdout": stdout or str(directory / "stdout.txt"), "stderr": str(directory / "stderr.txt"),
                   "status": str(directory / "exit.status")}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply.strip().isdigit(), f"the zygote failed (exit {self.process.poll()})"
        self.children.append(Child(int(reply), directory))
        return self.children[-1]

    def close(self) -> None:
        for child in self.children:  # a failed test may leave one hanging in a fault
            if not child.status_path.exists():
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGKILL)
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def zygote():
    forker = Zygote()
    yield forker
    forker.close()


# ---------------------------------------------------------------- signals

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus: Path) -> Path:
    """The same run as the signal tests, never interrupted: what a resumed run must reproduce."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, _, stderr = invoke("train", corpus, "--out", run, *RUN_FLAGS)
    assert code == 0, stderr
    return run


def _eval_rows(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["val_loss"]) for row in ckpt.read_metrics(run) if row["kind"] == "eval"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_saves_at_a_step_boundary_and_resume_reproduces_the_run(
        tmp_path: Path, zygote: Zygote, corpus: Path, uninterrupted: Path, sig: signal.Signals) -> None:
    run = tmp_path / "run"
    child = zygote.spawn(tmp_path / "child", "train", corpus, "--out", run, *RUN_FLAGS, step_delay=0.1,
                         mark_step=14)
    child.wait_for(child.marker.with_suffix(".step"))
    child.send_signal(sig)
    assert child.wait() == 130
    assert "Traceback" not in child.stderr and "error:" not in child.stderr  # a stop on request is no error
    line = child.stderr.strip().splitlines()[-1]
    assert "interrupted" in line and f"--resume {run}" in line

    state = json.loads((run / "last" / "state.json").read_text(encoding="utf-8"))
    assert 14 <= state["step"] < MAX_STEPS and state["step_in_epoch"] == state["step"] and state["epoch"] == 0
    resume_to_the_end(run)
    # nothing lost: the same evaluations and the same final weights as a run never interrupted
    assert _eval_rows(run) == _eval_rows(uninterrupted)
    final, expected = (ckpt.load_tensors(r / "last" / "model.safetensors") for r in (run, uninterrupted))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_a_second_signal_exits_at_once_and_the_previous_checkpoint_survives(
        tmp_path: Path, zygote: Zygote, corpus: Path) -> None:
    run = tmp_path / "run"
    child = zygote.spawn(tmp_path / "child", "train", corpus, "--out", run, *RUN_FLAGS, fault="hang-in-fsync",
                         step_delay=0.1, mark_step=14)
    child.wait_for(child.marker.with_suffix(".step"))
    child.send_signal(signal.SIGTERM)  # stop at the next step boundary and save ...
    child.wait_for(child.marker)  # ... which hangs in the middle of writing the checkpoint
    started = time.monotonic()
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) == 130
    assert time.monotonic() - started < 10, "the second signal did not exit at once"

    assert saved_step(run) == 10 and ckpt.last_dir(run).name == "last"  # the half-written one is not it
    assert temporaries(run), "expected the interrupted write's temporary files"
    resume_to_the_end(run)


# ---------------------------------------------------------------- kills and write errors

@pytest.mark.parametrize("fault", ["hang-in-fsync", "hang-between-renames"])
def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one_loadable(
        tmp_path: Path, zygote: Zygote, corpus: Path, fault: str) -> None:
    from textrnn.checkpoint import load_run

    run = tmp_path / "run"
    child = zygote.spawn(tmp_path / "child", "train", corpus, "--out", run, *RUN_FLAGS, fault=fault)
    child.wait_for(child.marker)  # the second checkpoint (step 20) is being written
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    assert saved_step(run) == 10
    load_run(run)  # the best weights
    load_run(run, weights="last")
    if fault == "hang-in-fsync":
        assert temporaries(run), "expected the interrupted write's temporary file"
    else:
        assert not (run / "last").exists() and (run / "last.old").is_dir()
    code, stdout, stderr = invoke("generate", "-c", run, "--length", "10", "--seed", "1")
    assert code == 0 and len(stdout) == 11, stderr
    resume_to_the_end(run)


def test_a_file_size_limit_fails_a_checkpoint_write_clearly_and_keeps_the_old_one(
        tmp_path: Path, zygote: Zygote, corpus: Path) -> None:
    """A real EFBIG from the kernel in the middle of writing the 10 kB weights."""
    run = tmp_path / "run"
    child = zygote.spawn(tmp_path / "child", "train", corpus, "--out", run, *RUN_FLAGS, fault="file-size-limit")
    assert child.wait() == 1  # a failure of the storage, not of the user's input
    line = error_line(child.stderr)
    assert "File too large" in line and str(run) in line
    assert saved_step(run) == 10
    assert temporaries(run) == [], "a failed write left a temporary file"
    resume_to_the_end(run)


class _FullDiskFile:
    """A file object whose writes fail as they do on a full disk."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> "_FullDiskFile":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


@pytest.mark.parametrize("where", ["every-write", "fsync"])
def test_a_full_disk_stops_training_clearly_and_keeps_the_old_checkpoint(
        tmp_path: Path, corpus: Path, monkeypatch, where: str) -> None:
    """ENOSPC on every write into the run directory, or from fsync, once the first checkpoint is saved."""
    import builtins
    import io as io_module

    run = tmp_path / "run"
    real_save_last, real_open, real_fsync = training.save_last, builtins.open, os.fsync
    saves = []

    def save_last(*args, **kwargs):
        real_save_last(*args, **kwargs)
        saves.append(1)

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
        if saves and any(c in mode for c in "wax+") and name.startswith(str(run.resolve())):
            return _FullDiskFile(handle)
        return handle

    def fsync(fd):
        if saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(training, "save_last", save_last)
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io_module, "open", open_)
    code, _, stderr = invoke("train", corpus, "--out", run, *RUN_FLAGS)
    monkeypatch.undo()
    assert code == 1  # a failure of the storage, not of the user's input
    line = error_line(stderr)
    assert "No space left on device" in line and str(run) in line
    assert saved_step(run) == 10
    assert temporaries(run) == [], "a failed write left a temporary file"
    assert_every_saved_tensor_finite(run)
    resume_to_the_end(run)


# ---------------------------------------------------------------- NaN and divergence (in this process)

def _train(tmp_path: Path, corpus: Path, log: list[str] | None = None, **settings) -> training.TrainResult:
    config = dict(seq_len=16, batch_size=4, max_steps=12, eval_every=4, warmup_steps=0, device="cpu")
    return training.train([corpus], tmp_path / "run", ModelConfig(num_layers=1, hidden_size=16, embedding_dim=8,
                                                                   dropout=0.0),
                          TrainConfig(**{**config, **settings}), log=(log.append if log is not None else print))


def _poisoned_loss(bad_calls, gradient: bool = False):
    """``training._loss`` made NaN on the given call numbers (in the loss, or only in its gradient)."""
    real = training._loss
    calls = 0

    def loss(logits, targets):
        nonlocal calls
        calls += 1
        if calls in bad_calls:
            if gradient:  # a finite loss whose backward pass brings NaN
                logits.register_hook(lambda grad: grad * float("nan"))
            else:
                return real(logits, targets) * float("nan")
        return real(logits, targets)

    return loss


class _From:
    def __init__(self, first: int):
        self.first = first

    def __contains__(self, call: int) -> bool:
        return call >= self.first


@pytest.mark.parametrize("gradient", [False, True], ids=["nan-loss", "nan-gradient"])
def test_isolated_nan_steps_are_skipped_and_counted(tmp_path: Path, corpus: Path, monkeypatch, gradient) -> None:
    monkeypatch.setattr(training, "_loss", _poisoned_loss({3, 7}, gradient))
    log: list[str] = []
    result = _train(tmp_path, corpus, log)
    assert result.step == 12
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text(encoding="utf-8"))
    assert state["bad_steps"] == 2
    assert sum("skipped" in line for line in log) == 2
    assert_every_saved_tensor_finite(tmp_path / "run")


def test_nan_past_the_threshold_aborts_and_keeps_the_last_good_checkpoint(tmp_path: Path, corpus: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(training, "_loss", _poisoned_loss(_From(7)))  # steps 6 on are NaN
    with pytest.raises(TrainingError, match="3 bad steps in a row"):
        _train(tmp_path, corpus, max_bad_steps=3)
    assert saved_step(tmp_path / "run") == 4
    assert_every_saved_tensor_finite(tmp_path / "run")


def test_nan_past_the_threshold_through_the_cli_exits_1(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setattr(training, "_loss", _poisoned_loss(_From(7)))
    code, _, stderr = invoke("train", corpus, "--out", tmp_path / "run", *TINY_MODEL, "--max-steps", "12",
                             "--eval-every", "4")
    assert code == 1
    assert "diverged" in error_line(stderr)
    assert saved_step(tmp_path / "run") == 4
    assert_every_saved_tensor_finite(tmp_path / "run")


def test_a_learning_rate_a_million_times_too_big_is_clipped_and_reported_as_divergence(
        tmp_path: Path, corpus: Path, monkeypatch) -> None:
    real_rate, real_clip = training.learning_rate, torch.nn.utils.clip_grad_norm_
    clipped_norms: list[float] = []

    def runaway_rate(config, step, progress):  # from step 8 on, lr x 1e6
        return real_rate(config, step, progress) * (1e6 if step >= 8 else 1.0)

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real_clip(parameters, max_norm, *args, **kwargs)
        clipped_norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]))))
        return total

    monkeypatch.setattr(training, "learning_rate", runaway_rate)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    with pytest.raises(TrainingError, match="diverged"):
        _train(tmp_path, corpus, max_steps=40, grad_clip=1.0)
    assert clipped_norms and max(clipped_norms) <= 1.0 + 1e-4, "clipping did not bound the gradient"
    # nothing after the runaway step was written: the checkpoint is the one from step 8, and sane
    run = tmp_path / "run"
    assert saved_step(run) == 8
    assert_every_saved_tensor_finite(run)
    vocab = json.loads((run / "config.json").read_text(encoding="utf-8"))["model"]["vocab_size"]
    assert all(row["val_loss"] < 3 * math.log(vocab) for row in ckpt.read_metrics(run) if row["kind"] == "eval")


def test_a_huge_learning_rate_from_the_start_writes_no_weights(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = invoke("train", corpus, "--out", run, *TINY_MODEL, "--max-steps", "20", "--eval-every", "5",
                             "--lr", "3000")  # the default lr x 1e6
    assert code == 1
    line = error_line(stderr)
    assert "diverged" in line and "no checkpoint" in line
    assert not (run / "model.safetensors").exists() and not (run / "last").exists()


# ---------------------------------------------------------------- data changed under a run

@pytest.mark.parametrize("split", ["train", "val"])
def test_resume_notices_that_the_data_changed_after_preprocessing(tmp_path: Path, corpus: Path, split: str) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    assert invoke("preprocess", corpus, "--out", data)[0] == 0
    code, _, stderr = invoke("train", data, "--out", run, *TINY_MODEL, "--max-steps", "4", "--eval-every", "4")
    assert code == 0, stderr
    ids = data / f"{split}.bin"
    raw = bytearray(ids.read_bytes())
    raw[len(raw) // 2] = raw[0] if raw[len(raw) // 2] != raw[0] else raw[1]  # same size, one id different
    ids.write_bytes(bytes(raw))
    code, _, stderr = invoke("train", "--resume", run, "--max-steps", "8")
    assert code == 2
    line = error_line(stderr)
    assert f"{split}.bin" in line and "changed since the run started" in line


def test_resume_says_when_the_data_is_gone(tmp_path: Path, corpus: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    assert invoke("preprocess", corpus, "--out", data)[0] == 0
    assert invoke("train", data, "--out", run, *TINY_MODEL, "--max-steps", "4", "--eval-every", "4")[0] == 0
    (data / "train.bin").rename(tmp_path / "moved.bin")
    code, _, stderr = invoke("train", "--resume", run, "--max-steps", "8")
    assert code == 2 and "train.bin" in error_line(stderr)


# ---------------------------------------------------------------- a closed stdout

@pytest.fixture(scope="module")
def small_run(tmp_path_factory, corpus: Path) -> Path:
    run = tmp_path_factory.mktemp("small") / "run"
    assert invoke("train", corpus, "--out", run, *TINY_MODEL, "--max-steps", "2", "--eval-every", "2")[0] == 0
    return run


_GENERATE = "from textrnn.cli import app\napp(__import__('sys').argv[1:], prog_name='textrnn')\n"


def test_a_reader_that_goes_away_ends_generation_quietly(tmp_path: Path, zygote: Zygote, small_run: Path) -> None:
    """``textrnn generate | head``: the pipe closes mid-stream; exit 0, nothing on stderr, at once."""
    pipe = tmp_path / "stdout.fifo"
    os.mkfifo(pipe)
    child = zygote.spawn(tmp_path / "child", "generate", "-c", small_run, "--length", "5000000", "--seed", "1",
                         code=_GENERATE, stdout=str(pipe))
    with open(pipe, "rb") as reader:
        assert len(reader.read(100)) == 100
    assert child.wait(timeout=30) == 0
    assert child.stderr == ""


@pytest.mark.parametrize("stdout, words", [("closed", "closed"), ("/dev/full", "No space left")],
                         ids=["fd-1-closed", "dev-full"])
def test_an_unwritable_stdout_is_one_clear_line(tmp_path: Path, zygote: Zygote, small_run: Path, stdout: str,
                                                words: str) -> None:
    child = zygote.spawn(tmp_path / "child", "generate", "-c", small_run, "--length", "50", "--seed", "1",
                         code=_GENERATE, stdout=stdout)
    assert child.wait(timeout=30) == 1
    assert words in error_line(child.stderr)


# ---------------------------------------------------------------- a corpus larger than memory

_MEMMAP_CHILD = r"""
import json, resource, sys
import numpy as np
from pathlib import Path
import torch
from textrnn import training
from textrnn.config import ModelConfig, TrainConfig
from textrnn.evaluation import evaluate_ids
from textrnn.model import RNNLanguageModel

data_dir, run_dir, big_val = map(Path, sys.argv[1:])
tiny = dict(num_layers=1, hidden_size=16, embedding_dim=8, dropout=0.0)
result = training.train([data_dir], run_dir, ModelConfig(**tiny), TrainConfig(
    seq_len=16, batch_size=4, max_steps=6, eval_every=6, warmup_steps=0, device="cpu"))


class Enough(Exception):
    pass


# evaluating a huge split streams it: stop after three windows, which must come at once
model, windows = RNNLanguageModel(ModelConfig(vocab_size=256, **tiny)), 0
forward = model.forward


def counted(*args, **kwargs):
    global windows
    windows += 1
    if windows > 3:
        raise Enough
    return forward(*args, **kwargs)


model.forward = counted
try:
    evaluate_ids(model, np.memmap(big_val, dtype=np.uint8, mode="r"), seq_len=16, streams=4,
                 device=torch.device("cpu"))
except Enough:
    pass
print(json.dumps({"step": result.step, "windows": windows}))
"""
BIG = 32 << 30  # 32 GiB of token ids, more than this machine's memory; sparse, so it costs no disk


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # it has exited
        pass
    return 0


def test_a_corpus_larger_than_memory_trains_and_evaluates_in_bounded_memory(
        tmp_path: Path, zygote: Zygote, corpus: Path) -> None:
    data, big_val = tmp_path / "data", tmp_path / "big-val.bin"
    assert invoke("preprocess", corpus, "--out", data)[0] == 0
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == "uint8"
    try:
        os.truncate(data / "train.bin", BIG)  # the real ids, then a hole of zeros (a valid id)
        meta["splits"]["train"].update(tokens=BIG, chars=BIG)
        (data / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        big_val.touch()
        os.truncate(big_val, BIG)
        child = zygote.spawn(tmp_path / "child", data, tmp_path / "run", big_val, code=_MEMMAP_CHILD)
        base = _rss(child.pid)  # pages shared with the zygote (torch) count in the child's RSS
        limit, deadline, peak = base + (512 << 20), time.monotonic() + 120, 0
        while not child.status_path.exists():  # a watchdog: reading a split into memory fails the test, not the machine
            peak = max(peak, _rss(child.pid))
            if peak > limit or time.monotonic() > deadline:
                child.send_signal(signal.SIGKILL)
                child.wait()
                pytest.fail(f"the child grew by {(peak - base) >> 20} MiB (limit 512 MiB) or ran past the deadline")
            time.sleep(0.02)
        assert child.wait() == 0, child.stderr
    finally:
        for path in (data / "train.bin", big_val):
            path.unlink(missing_ok=True)
    report = json.loads(child.stdout.splitlines()[-1])
    assert report == {"step": 6, "windows": 4}
