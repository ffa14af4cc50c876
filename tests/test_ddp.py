"""DDP: two CPU processes with gloo on 127.0.0.1, launched by torchrun, against one process.

One torchrun launch (two ranks) makes all the runs, because starting Python and torch is most
of the cost on a small machine: a straight run to N steps; a run stopped at step K by rank 1
alone and resumed to N; and a run that fails in rank 0's setup. This file is also the script
torchrun starts (``_worker``); each rank dumps the weights it ends with. The tests then check,
against a single-process run with the same total streams (batch 2 x B):

- the weights are identical on both ranks, and equal the single-process ones within 1e-5;
- train losses and validation losses match the single-process run;
- exactly one run directory is written, by rank 0, and rank 1 logs nothing;
- the stopped-and-resumed run ends bit-identical to the straight one (same metrics rows too);
- an error in rank 0's setup reaches rank 1 as the same error, rather than leaving it waiting;
- resuming the 2-rank run in one process works, with a warning.

Deselect with ``-m "not ddp"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STEPS = 16  # N: 10 steps per epoch, so the runs cross an epoch boundary
STOP_AT = 8  # K: mid-epoch, so the resumed run needs the hidden state of both ranks
BATCH = 2  # streams per rank
MODEL = dict(cell="lstm", num_layers=2, hidden_size=16, embedding_dim=8, dropout=0.0)
TRAIN = dict(seq_len=16, lr=1e-2, warmup_steps=3, max_steps=STEPS, eval_every=6, log_every=2, seed=3,
             device="cpu", precision="fp32")


def _corpus() -> str:
    """~900 characters of short sentences: ~800 training tokens, 10 steps per epoch at 4 x 16."""
    import random

    rng = random.Random(0)
    sentences = ("the cat sat on the mat. ", "a dog ran to the log. ", "no hen is in the pen. ")
    return "".join(rng.choice(sentences) for _ in range(40))


def _configs(batch_size: int):
    from textrnn.config import ModelConfig, TrainConfig

    return ModelConfig(**MODEL), TrainConfig(batch_size=batch_size, **TRAIN)


@contextlib.contextmanager
def _record_models():
    """Make ``training`` build models that remember themselves, so a test can read their weights."""
    from textrnn import training

    built, original = [], training.RNNLanguageModel

    class Recorded(original):
        def __init__(self, config):
            super().__init__(config)
            built.append(self)

    training.RNNLanguageModel = Recorded
    try:
        yield built
    finally:
        training.RNNLanguageModel = original


def _weights(model) -> dict:
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def _fresh_rendezvous(port: int) -> None:
    """Let the next ``train`` make its process group on a new port, rank 0 hosting the store.

    Each ``train`` makes and destroys its own group; a second group on torchrun's store would
    find the first one's keys there (torch numbers groups from 0 again) and wait forever.
    """
    os.environ["MASTER_PORT"] = str(port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def _worker(out: Path, corpus: Path, ports: list[int]) -> None:
    """Run under torchrun: a straight run; a run stopped by rank 1 at K and resumed; a failed setup."""
    import torch
    from safetensors.torch import save_file

    from textrnn import training
    from textrnn.errors import TextRNNError

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    (out / f"pid-{rank}").write_text(str(os.getpid()))  # for the test to end a hung worker
    recording = _record_models()
    built = recording.__enter__()  # kept for the life of this process, which ends with the worker
    lines: list[str] = []
    summary: dict = {}
    work = out / "work"
    os.chdir(work)  # no --out: each rank would pick runs/NAME-TIME, and only rank 0's may exist

    model_config, train_config = _configs(BATCH)
    result = training.train([corpus], None, model_config, train_config, log=lines.append)
    save_file(_weights(built[-1]), str(out / f"straight-{rank}.safetensors"))
    summary["straight"] = {"run_dir": str(result.run_dir), "step": result.step, "stop": result.stop_reason}

    _fresh_rendezvous(ports[0])
    model_config, train_config = _configs(BATCH)
    try:
        training.train([corpus], "resumed", model_config, train_config, log=lines.append,
                       should_stop=lambda step: rank == 1 and step == STOP_AT)
        summary["interrupted"] = None
    except training.Interrupted as exc:
        summary["interrupted"] = str(exc)
    _fresh_rendezvous(ports[1])
    result = training.train(resume="resumed", log=lines.append)
    save_file(_weights(built[-1]), str(out / f"resumed-{rank}.safetensors"))
    summary["resumed"] = {"step": result.step, "stop": result.stop_reason}

    # rank 0 fails while setting up (the directory holds a run): rank 1 must fail too, not wait
    _fresh_rendezvous(ports[2])
    model_config, train_config = _configs(BATCH)
    try:
        training.train([corpus], "resumed", model_config, train_config, log=lines.append)
        summary["setup_error"] = None
    except TextRNNError as exc:
        summary["setup_error"] = f"{type(exc).__name__}: {exc}"

    (out / f"log-{rank}.txt").write_text("\n".join(lines))
    (out / f"summary-{rank}.json").write_text(json.dumps(summary))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_rows(run_dir: Path) -> list[dict]:
    keep = ("kind", "step", "loss", "lr", "grad_norm", "val_loss", "val_bpc")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in keep if k in row} for row in rows]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Launch the worker on two ranks with torchrun; the directory holding what they wrote."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "work").mkdir()
    corpus = out / "corpus.txt"
    corpus.write_text(_corpus(), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TEXTRNN_PROGRESS"):
        env.pop(name, None)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               __file__, "worker", str(out), str(corpus), *(str(_free_port()) for _ in range(3))]
    process = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # torchrun starts its workers in sessions of their own: end each
        process.kill()
        for pid_file in out.glob("pid-*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun hung; its output:\n{output[-6000:]}")
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-6000:]}"
    return out


@pytest.fixture(scope="module")
def single_run(ddp_runs: Path, tmp_path_factory):
    """The same training in one process, with both ranks' streams: batch 2 x B."""
    import torch

    from textrnn import training

    model_config, train_config = _configs(2 * BATCH)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _record_models() as built:
            result = training.train([ddp_runs / "corpus.txt"], tmp_path_factory.mktemp("single") / "run",
                                    model_config, train_config)
    finally:
        torch.set_num_threads(threads)
    return result, _weights(built[-1])


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.ddp
def test_ranks_agree_with_each_other_and_with_one_process(ddp_runs: Path, single_run) -> None:
    import torch

    from textrnn import checkpoint as ckpt

    rank0, rank1 = _load(ddp_runs / "straight-0.safetensors"), _load(ddp_runs / "straight-1.safetensors")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"

    result, single = single_run
    assert result.step == STEPS
    for name in rank0:
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-5, msg=f"{name} vs one process")

    summary = json.loads((ddp_runs / "summary-0.json").read_text())
    run_dir = ddp_runs / "work" / summary["straight"]["run_dir"]
    saved = ckpt.load_tensors(run_dir / ckpt.LAST_DIR / ckpt.WEIGHTS_FILE)
    for name in rank0:
        assert torch.equal(saved[name], rank0[name]), f"{name}: last/ is not what rank 0 trained"

    # train rows (loss averaged over both ranks) and eval rows (val split sharded, summed) match
    ddp_rows, single_rows = _train_rows(run_dir), _train_rows(result.run_dir)
    assert [(r["kind"], r["step"]) for r in ddp_rows] == [(r["kind"], r["step"]) for r in single_rows]
    assert any(r["kind"] == "eval" for r in ddp_rows)
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        for key in ("loss", "lr", "val_loss", "val_bpc"):
            if key in ddp_row:
                assert ddp_row[key] == pytest.approx(single_row[key], rel=1e-5, abs=1e-6), (key, ddp_row["step"])


@pytest.mark.ddp
def test_rank_zero_alone_writes_and_reports(ddp_runs: Path) -> None:
    work = ddp_runs / "work"
    assert sorted(p.name for p in work.iterdir()) == ["resumed", "runs"]
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, got {runs}"
    summaries = [json.loads((ddp_runs / f"summary-{r}.json").read_text()) for r in (0, 1)]
    assert {s["straight"]["run_dir"] for s in summaries} == {str(Path("runs") / runs[0].name)}
    assert (runs[0] / "config.json").exists() and (runs[0] / "last" / "state.json").exists()
    steps = [(row["kind"], row["step"]) for row in _train_rows(runs[0])]
    assert len(steps) == len(set(steps)), "a metrics row was written twice"
    config = json.loads((runs[0] / "config.json").read_text())
    state = json.loads((runs[0] / "last" / "state.json").read_text())
    assert config["world_size"] == state["world_size"] == 2

    log0 = (ddp_runs / "log-0.txt").read_text()
    assert f"effective batch {2 * BATCH} x {TRAIN['seq_len']} over 2 processes" in log0
    assert (ddp_runs / "log-1.txt").read_text() == ""


@pytest.mark.ddp
def test_a_stop_on_one_rank_stops_both_and_resume_is_exact(ddp_runs: Path) -> None:
    import torch

    summaries = [json.loads((ddp_runs / f"summary-{r}.json").read_text()) for r in (0, 1)]
    for summary in summaries:
        assert summary["interrupted"] and f"interrupted at step {STOP_AT}" in summary["interrupted"]
        assert summary["resumed"]["step"] == STEPS
    work = ddp_runs / "work"
    assert json.loads((work / "resumed" / "last" / "state.json").read_text())["step"] == STEPS

    straight = _load(ddp_runs / "straight-0.safetensors")
    for rank in (0, 1):
        resumed = _load(ddp_runs / f"resumed-{rank}.safetensors")
        for name in straight:
            assert torch.equal(resumed[name], straight[name]), f"rank {rank}: {name} differs after resume"
    run_dir = work / json.loads((ddp_runs / "summary-0.json").read_text())["straight"]["run_dir"]
    assert _train_rows(work / "resumed") == _train_rows(run_dir)


@pytest.mark.ddp
def test_a_setup_error_on_rank_zero_reaches_every_rank(ddp_runs: Path) -> None:
    for rank in (0, 1):
        error = json.loads((ddp_runs / f"summary-{rank}.json").read_text())["setup_error"]
        assert error == "InputError: resumed: already holds a run; use --resume resumed or another --out"


@pytest.mark.ddp
def test_resume_with_another_world_size_warns_and_goes_on(ddp_runs: Path, tmp_path: Path) -> None:
    import shutil

    import torch

    from textrnn import training

    summary = json.loads((ddp_runs / "summary-0.json").read_text())
    run_dir = tmp_path / "run"
    shutil.copytree(ddp_runs / "work" / summary["straight"]["run_dir"], run_dir)
    messages: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = training.train(resume=run_dir, resume_overrides={"max_steps": STEPS + 4}, log=messages.append)
    finally:
        torch.set_num_threads(threads)
    assert result.step == STEPS + 4
    assert any("saved with 2 process(es) on 1" in m for m in messages), messages
    state = json.loads((run_dir / "last" / "state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == STEPS + 4
    assert (state["epoch"], state["step_in_epoch"]) == (2, 4)  # saved in epoch 1: goes on from epoch 2


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]), [int(port) for port in sys.argv[4:7]])


@pytest.mark.ddp
def test_evaluate_scores_a_two_process_run_as_its_trainer_did(ddp_runs: Path, tmp_path: Path) -> None:
    from textrnn.evaluation import evaluate_file

    summary = json.loads((ddp_runs / "summary-0.json").read_text())
    run_dir = ddp_runs / "work" / summary["straight"]["run_dir"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["evaluation"] == {"streams": 2 * BATCH, "precision": "fp32"}  # both ranks' streams
    text = (ddp_runs / "corpus.txt").read_text(encoding="utf-8")
    val = tmp_path / "val.txt"
    val.write_text(text[len(text) - int(len(text) * 0.1):], encoding="utf-8")  # what preprocess held out
    best = min(row["val_loss"] for row in _train_rows(run_dir) if row["kind"] == "eval")
    assert evaluate_file(run_dir, val, device="cpu").loss == pytest.approx(best, abs=1e-6)
