"""``textrnn export --format web`` and textrnn.js in Node.js: the folder it writes, its refusals, and
the JavaScript sampler against Python's (greedy text for an LSTM and a GRU, a char and a byte
model; next-token probabilities; the top-k/top-p/temperature filter against
``filtered_probabilities``; seeded draws against their probabilities).

The Node tests need node and onnxruntime-node, which ``make test`` installs into ``.cache/node``
(or ``$TEXTRNN_ORT_NODE``: a folder whose node_modules holds it); they skip, with the reason, where
either is missing. The browser test is ``test_web_browser.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, invoke, sentence_corpus
from test_export import tiny_model, write_run

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from textrnn import web  # noqa: E402
from textrnn.config import ModelConfig  # noqa: E402
from textrnn.export import check_quantized, export_run, quantized_graph, step_graph  # noqa: E402
from textrnn.model import RNNLanguageModel  # noqa: E402
from textrnn.sampling import Sampler, _sample, filtered_probabilities  # noqa: E402
from textrnn.tokenizers import ByteTokenizer  # noqa: E402

NODE = shutil.which("node")
ORT_NODE = Path(os.environ.get("TEXTRNN_ORT_NODE", REPO / ".cache" / "node"))
DRIVER = REPO / "tests" / "js" / "driver.mjs"
SENTENCES = ("the cat sat on the mat.", "a dog ran to the park!", "we sing, you dance; they sleep.",
             "is it time to go? yes, it is.", "one two three four five six.")
GREEDY_PROMPT = "the dog "


def _runtime_or_skip():
    try:
        web.find_runtime(download=False)
    except Exception as exc:
        pytest.skip(f"no onnxruntime-web {web.ORT_WEB_VERSION} files: {exc}")


def node_or_skip():
    if NODE is None:
        pytest.skip("needs node (Node.js)")
    if not (ORT_NODE / "node_modules" / "onnxruntime-node" / "package.json").is_file():
        pytest.skip(f"needs onnxruntime-node in {ORT_NODE}/node_modules (make test installs it)")


def in_node(module: Path, tasks: list[dict]) -> list[dict]:
    """Run textrnn.js tasks in one Node process (tests/js/driver.mjs); their answers."""
    job = {"module": str(module), "ort": str(ORT_NODE), "tasks": tasks}
    done = subprocess.run([NODE, str(DRIVER)], input=json.dumps(job).encode(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def train_run(directory: Path, corpus: Path, cell: str, tokenizer: str = "char", steps: int = 200) -> Path:
    result = invoke("train", corpus, "--out", directory, "--cell", cell, "--layers", "2", "--hidden", "48",
                    "--embed", "16", "--max-steps", str(steps), "--batch-size", "16", "--seq-len", "32", "--seed", "3",
                    "--tokenizer", tokenizer, "--eval-every", str(steps), "--threads", "1", "--precision", "fp32")
    assert result.code == 0, result.stderr
    return directory


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Trained tiny runs (LSTM and GRU on chars, LSTM on bytes) and their web exports (shared with test_web_browser)."""
    _runtime_or_skip()
    root = tmp_path_factory.mktemp("web")
    corpus = root / "corpus.txt"
    corpus.write_text(sentence_corpus(SENTENCES, 20_000) + " café naïve", encoding="utf-8")
    made = {}
    for name, cell, tokenizer in (("lstm", "lstm", "char"), ("gru", "gru", "char"), ("byte", "lstm", "byte")):
        run = train_run(root / f"run-{name}", corpus, cell, tokenizer, 500 if tokenizer == "byte" else 200)
        out = root / f"web-{name}"
        result = invoke("export", run, "--format", "web", "--out", out)
        assert result.code == 0, result.stderr
        made[name] = (run, out)
    return made


# ---------------------------------------------------------------- the folder

def test_web_export_writes_a_page_the_model_and_the_runtime(exports):
    run, out = exports["lstm"]
    names = {p.name for p in out.iterdir()}
    assert names == {"model.onnx", "config.json", "tokenizer.json", "textrnn.js", "index.html", "package.json", "ort"}
    assert json.loads((out / "package.json").read_text())["type"] == "module"
    assert sorted(p.name for p in (out / "ort").iterdir()) == sorted(web.RUNTIME_FILES)
    config = json.loads((out / "config.json").read_text())
    assert config["web"] == {"runtime": "ort/ort.wasm.bundle.min.mjs", "onnxruntime_web": web.ORT_WEB_VERSION}
    assert config["precision"] == "fp32" and config["model"]["cell"] == "lstm"
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    assert (out / "textrnn.js").read_bytes() == (REPO / "textrnn" / "web" / "textrnn.js").read_bytes()
    # exporting again over the previous export is allowed, and gives the same model
    before = (out / "model.onnx").read_bytes()
    assert invoke("export", run, "--format", "web", "--out", out).code == 0
    assert (out / "model.onnx").read_bytes() == before


def test_cdn_runtime_writes_no_runtime_files(exports, tmp_path):
    run, _ = exports["gru"]
    result = invoke("export", run, "--format", "web", "--runtime", "cdn", "--out", tmp_path / "cdn")
    assert result.code == 0, result.stderr
    assert not (tmp_path / "cdn" / "ort").exists()
    config = json.loads((tmp_path / "cdn" / "config.json").read_text())
    assert config["web"]["runtime"] == web.ORT_WEB_CDN + web.ORT_MODULE
    assert f"onnxruntime-web@{web.ORT_WEB_VERSION}/" in config["web"]["runtime"]


def test_refusals_are_one_line_with_exit_2(exports, tmp_path):
    run, _ = exports["lstm"]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sentence_corpus(SENTENCES, 5_000), encoding="utf-8")
    bpe = tmp_path / "bpe-run"
    trained = invoke("train", corpus, "--out", bpe, "--tokenizer", "bpe", "--vocab-size", "320", "--max-steps", "1",
                     "--hidden", "16", "--layers", "1", "--batch-size", "2", "--seq-len", "8", "--threads", "1")
    assert trained.code == 0, trained.stderr
    cases = [
        (("export", run, "--format", "tflite", "--out", tmp_path / "x"), "tflite"),
        (("export", run, "--format", "web", "--out", tmp_path / "a-file"), "not a directory"),
        (("export", run, "--format", "web", "--out", tmp_path / "busy"), "holds other files"),
        (("export", run, "--format", "onnx", "--runtime", "cdn", "--out", tmp_path / "y"), "--format web"),
        (("export", run, "--format", "web", "--precision", "int4", "--out", tmp_path / "z"), "int4"),
    ]
    for args, needle in cases:
        result = invoke(*args)
        assert result.code == 2, (args, result)
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = invoke("export", bpe, "--format", "web", "--out", tmp_path / "w")
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "char and byte tokenizers" in lines[0], result.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "w").exists() and not (tmp_path / "x").exists()


def test_a_missing_runtime_is_one_clear_error(exports, tmp_path, monkeypatch):
    run, _ = exports["lstm"]
    monkeypatch.setenv("TEXTRNN_WEB_RUNTIME", str(tmp_path / "nowhere"))
    result = invoke("export", run, "--format", "web", "--out", tmp_path / "out")
    assert result.code == 2 and "TEXTRNN_WEB_RUNTIME" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fetch_checks_the_pinned_sha512(tmp_path):
    fake = tmp_path / "fake.tgz"
    fake.write_bytes(b"not the tarball")
    with pytest.raises(Exception, match="sha512"):
        web.fetch_runtime(tmp_path / "cache", url=fake.as_uri())
    assert not (tmp_path / "cache").exists()


def test_int8_export_is_smaller_and_checked_on_probabilities(exports, tmp_path):
    run, _ = exports["lstm"]
    result = invoke("export", run, "--format", "web", "--precision", "int8", "--out", tmp_path / "int8")
    assert result.code == 0, result.stderr
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["precision"] == "int8"
    # the bound: a 2x256 (the default's shape) of random weights, total variation of the next-token distribution
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(vocab_size=65)).eval()
    fp32 = step_graph(model)
    int8 = quantized_graph(fp32)
    assert len(int8) < len(fp32) / 2.5
    distance, loss_gap = check_quantized(model, int8)
    assert distance < 0.01 and abs(loss_gap) < 0.01


def test_an_int8_export_too_far_from_fp32_fails_and_writes_nothing(exports, tmp_path, monkeypatch):
    from textrnn import export

    run, _ = exports["gru"]
    monkeypatch.setattr(export, "INT8_DISTANCE", 0.0)
    result = invoke("export", run, "--format", "web", "--precision", "int8", "--out", tmp_path / "out")
    assert result.code == 1 and "export this model in fp32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- textrnn.js against Python

@pytest.mark.parametrize("name", ["lstm", "gru", "byte"])
def test_greedy_text_in_node_is_the_text_of_textrnn_generate(exports, name):
    node_or_skip()
    run, out = exports[name]
    prompt = GREEDY_PROMPT + ("é" if name == "byte" else "")
    python = invoke("generate", "--checkpoint", run, "--prompt", prompt, "--length", "500", "--temperature", "0")
    assert python.code == 0, python.stderr
    expected = python.stdout[len(prompt):].rstrip("\n")
    node = in_node(out / "textrnn.js", [
        {"model": str(out), "generate": {"prompt": prompt, "length": 500, "temperature": 0}},
        {"model": str(out), "generate": {"prompt": "", "length": 200, "temperature": 0}},
    ])
    assert "error" not in node[0], node[0]
    assert node[0]["text"] == expected
    assert node[1]["text"] == Sampler.from_checkpoint(run, "cpu").generate("", 200, temperature=0)
    assert len(set(expected)) > 3  # not one repeated character


def test_node_next_token_probabilities_match_python(exports):
    node_or_skip()
    run, out = exports["lstm"]
    text = "the cat sat on"
    scores = Sampler.from_checkpoint(run, "cpu")
    model, tokenizer = scores.model, scores.tokenizer
    with torch.inference_mode():
        logits, _ = model(torch.tensor([tokenizer.encode(text)]))
    expected = torch.softmax(logits[0, -1, :-1].float(), -1)  # the unknown id is never offered
    answer = in_node(out / "textrnn.js", [{"model": str(out), "predict": {"feed": text}}])[0]
    got = torch.zeros_like(expected)
    for entry in answer["probabilities"]:
        got[entry["id"]] = entry["probability"]
        assert entry["char"] == tokenizer.decode([entry["id"]])
    assert float((got - expected).abs().max()) < 1e-5
    assert answer["sample"] in tokenizer.chars


def _filter_cases():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(40, generator=generator) * 3  # no ties
    yield logits, {"temperature": 1.0}
    yield logits, {"temperature": 0.7, "topK": 5}
    yield logits, {"temperature": 1.3, "topP": 0.6}
    yield logits, {"temperature": 0.9, "topK": 12, "topP": 0.8}
    yield logits, {"temperature": 0.0}
    yield logits, {"temperature": 2.0, "topK": 40, "topP": 1e-9}
    odd = logits.clone()
    odd[3], odd[7] = float("nan"), float("-inf")
    yield odd, {"temperature": 0.5, "topP": 0.95}


def test_js_filter_keeps_what_sample_logits_keeps():
    node_or_skip()
    cases = list(_filter_cases())
    # JSON has no NaN or infinity: they travel as strings, which the driver turns back
    tasks = [{"filter": {"logits": [x if math.isfinite(x) else str(x) for x in l.tolist()], "options": o}}
             for l, o in cases]
    answers = in_node(REPO / "textrnn" / "web" / "textrnn.js", tasks)
    for (logits, options), answer in zip(cases, answers):
        ids, probs = filtered_probabilities(logits[None], options["temperature"], options.get("topK", 0),
                                            options.get("topP", 1.0))
        kept = int((probs[0] > 0).sum())
        assert answer["ids"] == ids[0, :kept].tolist(), options
        assert max(abs(a - b) for a, b in zip(answer["probs"], probs[0, :kept].tolist())) < 1e-6, options


def test_js_draws_pick_what_python_picks_for_the_same_uniform_number():
    node_or_skip()
    logits = torch.randn(30, generator=torch.Generator().manual_seed(2)) * 2
    ids, probs = filtered_probabilities(logits[None], 0.8, 10, 0.9)
    kept = int((probs[0] > 0).sum())
    draws = [i / 97 for i in range(1, 98)]
    answer = in_node(REPO / "textrnn" / "web" / "textrnn.js",
                     [{"pick": {"probs": probs[0, :kept].tolist(), "draws": draws}}])[0]
    python = _sample(logits[None].expand(len(draws), -1) - logits.max(), 0.8, 10, 0.9, None,
                     draw=torch.tensor(draws)[:, None])
    assert [ids[0, p].item() for p in answer["picks"]] == python.tolist()


def test_seeded_js_draws_follow_the_probabilities():
    """A chi-square test on 20,000 seeded draws from 6 probabilities: at 5 degrees of freedom the
    statistic exceeds 20.5 with probability 0.001, so a correct sampler passes; a sampler that
    drifts by 0.02 on one token gives about 60. The seed makes the outcome fixed."""
    node_or_skip()
    probs = [0.4, 0.25, 0.15, 0.1, 0.07, 0.03]
    n = 20_000
    module = REPO / "textrnn" / "web" / "textrnn.js"
    first, again, other = in_node(module, [{"draws": {"probs": probs, "seed": 11, "n": n}},
                                           {"draws": {"probs": probs, "seed": 11, "n": n}},
                                           {"draws": {"probs": probs, "seed": 12, "n": n}}])
    assert first == again and first != other
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(first["counts"], probs))
    assert chi2 < 20.5, (chi2, first["counts"])


def test_js_stream_is_generate_and_honours_stop_and_penalty(exports):
    node_or_skip()
    run, out = exports["lstm"]
    options = {"prompt": "the ", "length": 300, "temperature": 0.9, "seed": 4, "topK": 8}
    stopped = {**options, "stop": ["."]}
    penalised = {"prompt": "the ", "length": 200, "temperature": 0, "repetitionPenalty": 1.3}
    m = str(out)
    full, pieces, cut, again, greedy_penalised = in_node(out / "textrnn.js", [
        {"model": m, "generate": options}, {"model": m, "stream": options}, {"model": m, "generate": stopped},
        {"model": m, "generate": options}, {"model": m, "generate": penalised}])
    assert "".join(pieces["pieces"]) == full["text"] == again["text"]
    if "." in full["text"]:
        assert cut["text"] == full["text"][:full["text"].index(".") + 1]
    else:
        assert cut["text"] == full["text"]
    python = Sampler.from_checkpoint(run, "cpu").generate("the ", 200, temperature=0, repetition_penalty=1.3)
    assert greedy_penalised["text"] == python


def test_js_errors_are_clear(exports):
    node_or_skip()
    _, out = exports["lstm"]
    m = str(out)
    answers = in_node(out / "textrnn.js", [
        {"model": m, "generate": {"prompt": "ZZZ", "length": 5}},
        {"model": m, "generate": {"prompt": "ZZZ the", "length": 5, "unknown": "skip", "temperature": 0}},
        {"model": m, "generate": {"temperature": -1}},
        {"model": m, "generate": {"topP": 0}},
        {"model": m, "generate": {"length": 2.5}},
    ])
    assert "never saw" in answers[0]["error"] and '"Z"' in answers[0]["error"]
    assert "text" in answers[1]
    assert "temperature" in answers[2]["error"]
    assert "topP" in answers[3]["error"]
    assert "length" in answers[4]["error"]


def test_a_byte_tokenizer_round_trips_utf8_in_js(exports):
    node_or_skip()
    _, out = exports["byte"]
    answer = in_node(out / "textrnn.js", [{"model": str(out), "generate": {"prompt": "naïve ", "length": 60,
                                                                           "temperature": 0.8, "seed": 1}}])[0]
    assert "error" not in answer and isinstance(answer["text"], str)
    assert ByteTokenizer().vocab_size == json.loads((out / "config.json").read_text())["model"]["vocab_size"]


def test_export_run_python_api(tmp_path):
    _runtime_or_skip()
    run = write_run(tmp_path / "run", tiny_model())
    out = export_run(run, tmp_path / "out", format="web", precision="int8", runtime="cdn")
    assert (out / "index.html").is_file() and not (out / "ort").exists()


def test_the_readme_node_example_finds_onnxruntime_node_itself(exports, tmp_path):
    """As README has it: the export in a folder whose node_modules holds onnxruntime-node, no {ort} passed."""
    node_or_skip()
    run, out = exports["gru"]
    project = tmp_path / "project"
    shutil.copytree(out, project / "model-web")
    (project / "node_modules").symlink_to(ORT_NODE / "node_modules")
    script = ('import { TextRNN } from "./model-web/textrnn.js";\n'
              'const model = await TextRNN.load("model-web");\n'
              'for await (const piece of model.stream({ prompt: "the ", length: 80, temperature: 0 }))'
              ' process.stdout.write(piece);\n')
    done = subprocess.run([NODE, "--input-type=module", "-e", script], cwd=project, capture_output=True, timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr.decode()
    assert done.stdout.decode() == Sampler.from_checkpoint(run, "cpu").generate("the ", 80, temperature=0)


def test_node_without_onnxruntime_node_says_what_to_install(exports, tmp_path):
    node_or_skip()
    _, out = exports["lstm"]
    shutil.copytree(out, tmp_path / "model-web")
    script = ('import { TextRNN } from "./model-web/textrnn.js";\n'
              'try { await TextRNN.load("model-web"); } catch (error) { console.log(error.message); }\n')
    done = subprocess.run([NODE, "--input-type=module", "-e", script], cwd=tmp_path, capture_output=True, timeout=60)
    assert f"npm install onnxruntime-node@{web.ORT_WEB_VERSION}" in done.stdout.decode(), done
