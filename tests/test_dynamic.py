"""Dynamic evaluation and ``generate --adapt``: the adapted copy learns, the static number is
``evaluate``'s, the run's files never change, and bad input is refused in one line.

One tiny run (trained for a few steps here) serves every case; the scored texts use only its
characters, so every target counts.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import invoke

WORDS = "the cat sat on a mat and then ran off to see its old friend by the red barn".split()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from textrnn.config import ModelConfig, TrainConfig
    from textrnn.training import train

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("dynamic")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(9)) + ".\n" for _ in range(300)))
    out = root / "run"
    train([corpus], out, ModelConfig(num_layers=1, hidden_size=32, embedding_dim=16, dropout=0.0),
          TrainConfig(seq_len=16, batch_size=8, max_steps=40, eval_every=40, warmup_steps=0, device="cpu",
                      sample_length=0))
    return out


@pytest.fixture(scope="module")
def repeated(tmp_path_factory) -> Path:
    """One made-up line of the corpus's words, repeated: a model that adapts predicts it ever better."""
    line = "a red cat ran to the old barn then off to see its friend.\n"
    path = tmp_path_factory.mktemp("texts") / "repeated.txt"
    path.write_text(line * 30)
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# the defaults suit trained models' small steps; this run has had 40 steps, so it takes larger ones
FAST = {"lr": 3e-3}


def test_dynamic_evaluation_lowers_the_loss_on_a_repeated_text(run_dir: Path, repeated: Path) -> None:
    from textrnn.dynamic import DynamicConfig, evaluate_dynamic

    default = evaluate_dynamic(run_dir, repeated, device="cpu")
    assert default.dynamic.tokens == default.static.tokens == len(repeated.read_text()) - 1
    assert default.dynamic.loss < default.static.loss - 0.05, (default.static.loss, default.dynamic.loss)
    assert "data/train.bin" in default.statistics
    fast = evaluate_dynamic(run_dir, repeated, DynamicConfig(**FAST), device="cpu")
    assert fast.static == default.static
    assert fast.dynamic.loss < default.static.loss - 0.5, (default.static.loss, fast.dynamic.loss)


def test_the_static_number_is_plain_evaluates(run_dir: Path, repeated: Path) -> None:
    from textrnn.dynamic import evaluate_dynamic
    from textrnn.evaluation import evaluate_file

    assert evaluate_dynamic(run_dir, repeated, device="cpu").static == evaluate_file(run_dir, repeated, device="cpu")
    plain = invoke("evaluate", run_dir, repeated)
    both = invoke("evaluate", run_dir, repeated, "--dynamic")
    assert plain.code == both.code == 0, both.stderr
    static_line, dynamic_line, summary = both.stdout.splitlines()
    assert plain.stdout.split("nats/token")[0].split("loss ")[1] == static_line.split("nats/token")[0].split("loss ")[1]
    assert "static" in static_line and "dynamic" in dynamic_line and "lower" in summary


def test_the_runs_files_never_change(run_dir: Path, repeated: Path) -> None:
    before = _hashes(run_dir)
    assert invoke("evaluate", run_dir, repeated, "--dynamic", "--lr", "0.03").code == 0
    generated = invoke("generate", "-c", run_dir, "--adapt", repeated, "-p", "a red", "-n", "40", "--seed", "1")
    assert generated.code == 0, generated.stderr
    assert generated.stdout.startswith("a red")
    assert _hashes(run_dir) == before


def test_adapt_returns_an_adapted_copy_and_leaves_the_sampler_alone(run_dir: Path, repeated: Path) -> None:
    from textrnn import Sampler
    from textrnn.dynamic import DynamicConfig, adapt
    from textrnn.evaluation import evaluate_ids

    sampler = Sampler.from_checkpoint(run_dir, device="cpu", engine="torch")
    trained = {name: tensor.clone() for name, tensor in sampler.model.state_dict().items()}
    text = repeated.read_text()
    adapted = adapt(sampler, text, config=DynamicConfig(**FAST))
    for name, tensor in sampler.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    ids = sampler.tokenizer.encode_array(text)
    losses = [evaluate_ids(s.model, ids, seq_len=16, streams=1, device=torch.device("cpu"))[0]
              for s in (sampler, adapted)]
    assert losses[1] < 0.8 * losses[0], losses  # the weights learned the text, not only the state
    assert adapted.generate("a red", length=60, seed=3) != sampler.generate("a red", length=60, seed=3)


def test_without_its_training_split_it_uses_the_models_own_samples(run_dir: Path, repeated: Path, tmp_path: Path
                                                                   ) -> None:
    from textrnn.dynamic import DynamicConfig, evaluate_dynamic

    alone = tmp_path / "copied"
    shutil.copytree(run_dir, alone, ignore=shutil.ignore_patterns("data"))
    with pytest.warns(UserWarning, match="sampled from the model"):
        result = evaluate_dynamic(alone, repeated, DynamicConfig(**FAST), device="cpu")
    assert "sampled from the model" in result.statistics and "missing" in result.statistics
    assert result.dynamic.loss < result.static.loss - 0.5


def test_the_update_is_rms_normalised_with_a_decay_toward_the_trained_weights(run_dir: Path) -> None:
    from textrnn.checkpoint import load_run
    from textrnn.dynamic import EPSILON, Adapter, DynamicConfig, Statistics

    model = load_run(run_dir).model
    rms = [torch.rand_like(p) + 0.5 for p in model.parameters()]
    config = DynamicConfig(lr=0.1, decay=0.2)
    adapter = Adapter(model, Statistics(rms, "test", 0.0), config)
    mean = torch.cat([r.flatten() for r in rms]).mean()
    moved = [p.detach() + 0.3 for p in adapter.params]  # somewhere away from the trained weights
    for p, value in zip(adapter.params, moved):
        p.data.copy_(value)
    grads = tuple(torch.randn_like(p) for p in adapter.params)
    adapter._step(grads)
    for p, w, g, r, w0 in zip(adapter.params, moved, grads, rms, model.parameters()):
        stepped = w - 0.1 * g / (r + EPSILON * mean)
        expected = stepped + (0.2 * r / mean).clamp(max=1) * (w0.detach() - stepped)
        torch.testing.assert_close(p.detach(), expected)


def _one_error_line(result, *words: str) -> None:
    assert result.code == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, ["missing.txt", "no such file"]),
    ("empty.txt", b"", ["empty.txt", "empty"]),
    ("bad.txt", b"good text\xff\n", ["bad.txt", "invalid UTF-8"]),
    ("folder", "dir", ["folder", "directory"]),
])
def test_adapt_refuses_a_bad_file_in_one_line(run_dir: Path, tmp_path: Path, name, content, words) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    _one_error_line(invoke("generate", "-c", run_dir, "--adapt", path, "-p", "a", "-n", "5"), *words)


def test_dynamic_settings_are_checked(run_dir: Path, repeated: Path) -> None:
    _one_error_line(invoke("evaluate", run_dir, repeated, "--lr", "0.01"), "--lr", "--dynamic")
    _one_error_line(invoke("evaluate", run_dir, repeated, "--dynamic", "--decay", "2"), "decay")
    _one_error_line(invoke("evaluate", run_dir, repeated, "--dynamic", "--seq-len", "0"), "seq_len")


def test_the_help_shows_the_libraries_defaults() -> None:
    from textrnn.dynamic import DynamicConfig

    shown = " ".join(invoke("evaluate", "--help").stdout.split())
    config = DynamicConfig()
    for value in (f"{config.lr:g}", f"{config.decay:g}", str(config.seq_len)):
        assert f"[default: {value}]" in shown, value
