"""The run directory: weights round trip through safetensors, atomic writes, and clear errors
for directories that are not runs, damaged weights and newer format versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from textrnn import checkpoint as ckpt
from textrnn.cli import app
from textrnn.config import ModelConfig, TrainConfig
from textrnn.errors import CheckpointError, TextRNNError
from textrnn.model import RNNLanguageModel
from textrnn.training import train

TEXT = "the cat sat on the mat. a dog ran to the log. no hen is in the pen. " * 60


def _model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(cell="lstm", num_layers=2, hidden_size=16, embedding_dim=12, dropout=0.1),
                          **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished tiny runs: untied, and tied with hidden != embedding (a projection)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    made = {}
    for name, tie in (("untied", False), ("tied", True)):
        train([root / "corpus.txt"], root / name, _model_config(tie_weights=tie),
              TrainConfig(seq_len=16, batch_size=4, max_steps=4, eval_every=4, device="cpu", precision="fp32"))
        made[name] = root / name
    return made


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("tie, embedding_dim", [(False, 12), (True, 12), (True, 16)])
def test_weights_round_trip_exactly(tmp_path, cell, tie, embedding_dim):
    config = _model_config(cell=cell, tie_weights=tie, embedding_dim=embedding_dim, vocab_size=19)
    torch.manual_seed(1)
    original = RNNLanguageModel(config).eval()
    ckpt.save_tensors(tmp_path / "model.safetensors", ckpt.model_tensors(original))
    torch.manual_seed(2)
    loaded = RNNLanguageModel(config).eval()
    ckpt.load_weights(loaded, tmp_path / "model.safetensors")

    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if tie:
        assert loaded.head.weight is loaded.embedding.weight  # still one tensor after loading
        assert "head.weight" not in ckpt.load_tensors(tmp_path / "model.safetensors")
    ids = torch.randint(0, 19, (3, 9))
    assert torch.equal(original(ids)[0], loaded(ids)[0])


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_load_run_gives_the_saved_weights_and_logits(runs, name):
    run_dir = runs[name]
    run = ckpt.load_run(run_dir)
    saved = ckpt.load_tensors(run_dir / "model.safetensors")
    state = run.model.state_dict()
    assert set(saved) | ({"head.weight"} if name == "tied" else set()) == set(state)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    assert not run.model.training and run.tokenizer.vocab_size == run.model.config.vocab_size
    if name == "tied":
        assert run.model.head.weight is run.model.embedding.weight
        assert run.model.projection.weight.shape == (12, 16)

    # the same logits as a model built by hand from config.json and the same file
    config = json.loads((run_dir / "config.json").read_text())
    fresh = RNNLanguageModel(ModelConfig.from_dict(config["model"])).eval()
    fresh.load_state_dict({**saved, **({"head.weight": saved["embedding.weight"]} if name == "tied" else {})})
    ids = torch.tensor([run.tokenizer.encode("the cat sat on the mat.")])
    assert torch.equal(run.model(ids)[0], fresh(ids)[0])

    # the best weights (evaluated at the last step here) are the last weights
    last = ckpt.load_run(run_dir, weights="last").model.state_dict()
    assert all(torch.equal(last[k], state[k]) for k in state)


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    ckpt.write_json(path, {"version": 1})

    def broken_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(ckpt.os, "fsync", broken_fsync)
    with pytest.raises(TextRNNError, match="config.json: cannot write"):  # a one-line error, not an OSError
        ckpt.write_json(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind


def test_staging_directory_replaces_last_only_when_complete(tmp_path):
    last = tmp_path / "last"
    with ckpt.staging_directory(last) as tmp:
        (tmp / "state.json").write_text("1")
    with pytest.raises(RuntimeError):
        with ckpt.staging_directory(last) as tmp:
            (tmp / "state.json").write_text("2")
            raise RuntimeError("killed halfway")
    assert (last / "state.json").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    with ckpt.staging_directory(last) as tmp:
        (tmp / "state.json").write_text("3")
    assert (last / "state.json").read_text() == "3"


def test_resume_after_a_crash_between_the_renames_of_last(tmp_path, runs):
    """Killed after ``last/`` became ``last.old/`` and before the new one was renamed into place."""
    run_dir = _copy(runs["untied"], tmp_path)
    (run_dir / "last").rename(run_dir / "last.old")
    (run_dir / ".tmp-last.abc123").mkdir()  # the half-written new checkpoint
    (run_dir / ".tmp-last.abc123" / "state.json").write_text("{")
    assert ckpt.last_dir(run_dir) == run_dir / "last.old"
    result = train(resume=run_dir, resume_overrides={"max_steps": 6})
    assert result.step == 6
    assert json.loads((run_dir / "last" / "state.json").read_text())["step"] == 6
    assert not (run_dir / ".tmp-last.abc123").exists()


# ---------------------------------------------------------------- clear errors

def _one_line(message: str) -> str:
    assert "\n" not in message.strip()
    return message


def test_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a textrnn run"):
        ckpt.load_run(tmp_path)
    with pytest.raises(CheckpointError, match="no such run directory"):
        ckpt.load_run(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is a file"):
        ckpt.load_run(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text('{"name": "some other tool"}')
    with pytest.raises(CheckpointError, match="not a textrnn-run file") as error:
        ckpt.load_run(tmp_path)
    _one_line(str(error.value))
    (tmp_path / "config.json").write_text("not json {")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.load_run(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_a_truncated_weights_file(tmp_path, runs, keep):
    run_dir = _copy(runs["untied"], tmp_path)
    weights = run_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="model.safetensors: (truncated|damaged)") as error:
        ckpt.load_run(run_dir)
    assert str(weights) in _one_line(str(error.value))


def test_a_truncated_resume_checkpoint(tmp_path, runs):
    run_dir = _copy(runs["untied"], tmp_path)
    weights = run_dir / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="last/model.safetensors: damaged"):
        train(resume=run_dir, resume_overrides={"max_steps": 6})


def test_weights_of_another_model(tmp_path, runs):
    run_dir = _copy(runs["untied"], tmp_path)
    shutil.copy(runs["tied"] / "model.safetensors", run_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match the model"):
        ckpt.load_run(run_dir)


def test_a_newer_format_version(tmp_path, runs):
    run_dir = _copy(runs["untied"], tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["version"] = ckpt.FORMAT_VERSION + 1
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer than this textrnn reads") as error:
        ckpt.load_run(run_dir)
    _one_line(str(error.value))
    with pytest.raises(CheckpointError, match="newer"):
        train(resume=run_dir, resume_overrides={"max_steps": 6})


def test_a_newer_state_version(tmp_path, runs):
    run_dir = _copy(runs["untied"], tmp_path)
    state = json.loads((run_dir / "last" / "state.json").read_text())
    state["version"] = ckpt.FORMAT_VERSION + 1
    (run_dir / "last" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="state.json: format version 2 is newer"):
        train(resume=run_dir, resume_overrides={"max_steps": 6})


# ---------------------------------------------------------------- the same errors through the CLI

runner = CliRunner()


def _cli_error(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_errors_are_one_line_and_exit_2(tmp_path, runs):
    (tmp_path / "plain").mkdir()
    assert "not a textrnn run" in _cli_error("info", tmp_path / "plain")
    assert "not a textrnn run" in _cli_error("train", "--resume", tmp_path / "plain")
    assert "not a textrnn run" in _cli_error("generate", "--checkpoint", tmp_path / "plain", "--length", "5")

    truncated = _copy(runs["untied"], tmp_path)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:64])
    assert "model.safetensors: damaged" in _cli_error("generate", "--checkpoint", truncated, "--length", "5")
    (truncated / "last" / "model.safetensors").write_bytes(b"")
    assert "model.safetensors: truncated" in _cli_error("train", "--resume", truncated, "--max-steps", "6")

    newer = tmp_path / "newer"
    shutil.copytree(runs["tied"], newer)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "version": 99}))
    assert "format version 99 is newer" in _cli_error("info", newer)
    assert "format version 99 is newer" in _cli_error("train", "--resume", newer)
