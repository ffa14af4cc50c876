"""ONNX export and the onnxruntime sampling engine: the step graph against PyTorch for every cell,
``textrnn export`` and its refusals, the engine's text against the torch engine's, the export
cache, and sampling from an export with numpy and onnxruntime only (torch made unimportable).

Runs are written directly (a tiny random model, no training), so each test takes about a second.
"""

from __future__ import annotations

import itertools
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, invoke

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from textrnn import checkpoint  # noqa: E402
from textrnn import export as export_module  # noqa: E402
from textrnn.checkpoint import WEIGHTS_FILE, model_tensors, save_tensors  # noqa: E402
from textrnn.config import ModelConfig  # noqa: E402
from textrnn.export import ONNX_FILE, check_export, export_run, step_graph  # noqa: E402
from textrnn.model import RNNLanguageModel  # noqa: E402
from textrnn.sampling import Sampler  # noqa: E402
from textrnn.tokenizers import CharTokenizer  # noqa: E402

CHARS = string.ascii_lowercase + " .,\n"


def tiny_model(cell: str = "lstm", tie: bool = False, layers: int = 2, hidden: int = 16, embedding: int = 8,
               vocab: int = len(CHARS) + 1, seed: int = 0) -> RNNLanguageModel:
    torch.manual_seed(seed)
    model = RNNLanguageModel(ModelConfig(vocab_size=vocab, cell=cell, tie_weights=tie, num_layers=layers,
                                         hidden_size=hidden, embedding_dim=embedding, dropout=0.0))
    with torch.no_grad():  # away from the initialisation's zeros, so every weight matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def write_run(directory: Path, model: RNNLanguageModel) -> Path:
    """A run directory as the trainer leaves it (config, tokenizer, best weights), without training."""
    return checkpoint.write_run(directory, model, CharTokenizer(CHARS))


@pytest.mark.parametrize("cell, tie, layers", list(itertools.product(["lstm", "gru", "rnn"], [True, False], [1, 2])))
def test_step_graph_matches_pytorch(cell, tie, layers):
    model = tiny_model(cell, tie, layers, hidden=16, embedding=8 if tie else 12)
    assert check_export(model, step_graph(model), steps=10, batch=3) < 1e-5


@pytest.mark.parametrize("cell, tie", list(itertools.product(["lstm", "gru", "rnn"], [True, False])))
def test_export_command_writes_a_checked_directory(tmp_path, cell, tie):
    run = write_run(tmp_path / "run", tiny_model(cell, tie))
    result = invoke("export", run, "--format", "onnx", "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {ONNX_FILE, "config.json", "tokenizer.json"}
    meta = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert meta["format"] == "textrnn-onnx" and meta["version"] == 1 and meta["model"]["cell"] == cell
    assert meta["tokenizer"]["chars"] and meta["unk_id"] == len(CHARS)

    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "out" / ONNX_FILE), providers=["CPUExecutionProvider"])
    lstm = cell == "lstm"
    assert [i.name for i in session.get_inputs()] == ["ids", "h"] + (["c"] if lstm else [])
    assert [o.name for o in session.get_outputs()] == ["logits", "h_out"] + (["c_out"] if lstm else [])
    # a second export over the first is fine
    assert invoke("export", run, "--out", tmp_path / "out").code == 0


def test_export_refusals_are_one_line(tmp_path):
    run = write_run(tmp_path / "run", tiny_model())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine", encoding="utf-8")
    cases = [(("export", run, "--out", busy), "holds other files"),
             (("export", tmp_path / "busy", "--out", tmp_path / "o1"), "not a textrnn run"),
             (("export", run, "--format", "tflite", "--out", tmp_path / "o2"), "tflite")]
    for args, fragment in cases:
        result = invoke(*args)
        assert result.code == 2, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_failed_check_leaves_nothing_behind(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", tiny_model())
    monkeypatch.setattr(export_module, "check_export", lambda model, graph: 0.5)
    result = invoke("export", run, "--out", tmp_path / "out")
    assert result.code == 1 and "differ from PyTorch's by 0.5" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_onnxruntime_engine_gives_the_torch_engines_text(cell):
    model, tokenizer = tiny_model(cell, hidden=24), CharTokenizer(CHARS)
    torch_engine = Sampler(model, tokenizer, precision="fp32", engine="torch")
    onnx_engine = Sampler(model, tokenizer, engine="onnxruntime")
    for options in (dict(temperature=0.9), dict(temperature=0.7, top_k=5, top_p=0.9), dict(num_samples=3)):
        expected = torch_engine.generate("the ", length=120, seed=5, **options)
        assert onnx_engine.generate("the ", length=120, seed=5, **options) == expected
    assert onnx_engine.engine_used == "onnxruntime"
    assert "".join(onnx_engine.stream("a", length=50, seed=2)) == torch_engine.generate("a", length=50, seed=2)


def test_auto_engine_picks_one_and_keeps_the_text(tmp_path):
    run = write_run(tmp_path / "run", tiny_model())
    sampler = Sampler.from_checkpoint(run, device="cpu", precision="fp32")
    assert sampler.engine == "auto"
    text = sampler.generate("the ", length=80, seed=1)
    assert sampler.engine_used in ("torch", "onnxruntime")
    reference = Sampler.from_checkpoint(run, device="cpu", precision="fp32", engine="torch")
    assert text == reference.generate("the ", length=80, seed=1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_int8_weights_stay_close_to_fp32_and_repeat_for_a_seed(cell):
    from textrnn.export import quantized_graph

    model, tokenizer = tiny_model(cell, hidden=64, embedding=16), CharTokenizer(CHARS)
    import onnx

    fp32 = step_graph(model)
    graph = quantized_graph(fp32)
    # every recurrent matrix is int8 now; layer 0's table and the head stay fp32
    layers = [node.name for node in onnx.load_from_string(fp32).graph.node if node.op_type == "Gemm"]
    quantized = [node.name for node in onnx.load_from_string(graph).graph.node if node.op_type == "MatMulInteger"]
    assert len(quantized) == len(layers) - 1 and not any(name.startswith("logits") for name in quantized)
    # quantized, so not exact, yet the same next-token distribution to about a percent
    ids = torch.randint(0, model.config.vocab_size, (4, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(ids)[0].softmax(-1)
    step, state, worst = export_module.OnnxStepper(graph, cell == "lstm").loop(), model.init_state(4, "cpu"), 0.0
    for t in range(ids.shape[1]):
        logits, state = step(ids[:, t], state)
        worst = max(worst, float((logits.softmax(-1) - expected[:, t]).abs().max()))
    assert 0 < worst < 0.03, worst
    sampler = Sampler(model, tokenizer, precision="int8", engine="auto")  # int8 means onnxruntime
    text = sampler.generate("the ", length=200, seed=4)
    assert sampler.engine_used == "onnxruntime" and len(text) == 200 and set(text) <= set(CHARS)
    assert sampler.generate("the ", length=200, seed=4) == text
    assert "".join(sampler.stream("the ", length=200, seed=4)) == text
    assert sampler.generate("the ", length=60, seed=4, num_samples=3, top_k=5)[0] != ""


def test_int8_refuses_the_torch_engine(tmp_path):
    from textrnn.errors import ConfigError

    with pytest.raises(ConfigError, match="int8 sampling weights run on the onnxruntime engine"):
        Sampler(tiny_model(), CharTokenizer(CHARS), precision="int8", engine="torch")
    run = write_run(tmp_path / "run", tiny_model())
    result = invoke("generate", "-c", run, "--precision", "int8", "--engine", "torch", "-n", "5")
    assert result.code == 2 and result.stderr.count("\n") == 1 and "onnxruntime" in result.stderr
    result = invoke("generate", "-c", run, "--precision", "int8", "-p", "the ", "-n", "30", "--seed", "1")
    assert result.code == 0 and result.stdout.startswith("the ") and len(result.stdout) == 4 + 30 + 1


def test_export_cache_is_reused_until_the_weights_change(tmp_path):
    run = write_run(tmp_path / "run", tiny_model())
    Sampler.from_checkpoint(run, device="cpu", engine="onnxruntime").generate("a", length=5, seed=0)
    cached = run / "onnx" / ONNX_FILE
    stamp = cached.stat().st_mtime_ns
    sampler = Sampler.from_checkpoint(run, device="cpu", engine="onnxruntime", precision="fp32")
    sampler.generate("a", length=5, seed=0)
    assert cached.stat().st_mtime_ns == stamp  # reused
    save_tensors(run / WEIGHTS_FILE, model_tensors(tiny_model(seed=1)))  # new weights
    fresh = Sampler.from_checkpoint(run, device="cpu", engine="onnxruntime", precision="fp32")
    text = fresh.generate("a", length=40, seed=0)
    assert cached.stat().st_mtime_ns != stamp
    assert text == Sampler.from_checkpoint(run, device="cpu", engine="torch", precision="fp32").generate(
        "a", length=40, seed=0)
    # a held sampler whose model changes in memory re-exports too
    with torch.no_grad():
        fresh.model.head.bias.add_(3.0)
    assert fresh.generate("a", length=40, seed=0) == Sampler(fresh.model, fresh.tokenizer, precision="fp32").generate(
        "a", length=40, seed=0)


def test_the_example_samples_without_torch(tmp_path):
    run = write_run(tmp_path / "run", tiny_model("gru", tie=True))
    assert invoke("export", run, "--out", tmp_path / "out").code == 0
    blocked = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    common = [sys.executable, "-c", blocked, str(REPO / "examples" / "sample_onnx.py"), str(tmp_path / "out"),
              "--prompt", "the ", "--length", "60", "--seed", "3"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outputs = []
    for extra in ([], [], ["--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"], ["--temperature", "0"]):
        done = subprocess.run(common + extra, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("the ") and len(done.stdout) == len("the ") + 60 + 1
        assert set(done.stdout) <= set(CHARS)
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]  # the same seed, the same text
    # greedy decoding follows the model's own argmax
    greedy = Sampler(tiny_model("gru", tie=True), CharTokenizer(CHARS), precision="fp32").generate(
        "the ", length=60, temperature=0)
    assert outputs[3] == "the " + greedy + "\n"
    # and torch really is out of reach in that process
    check = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                           capture_output=True, text=True, env=env)
    assert check.returncode != 0 and "import of torch halted" in check.stderr
