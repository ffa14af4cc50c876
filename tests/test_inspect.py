"""``textrnn inspect``: the states are the model's own, the feature finder finds a planted feature,
and the command writes one self-contained page (its browser test is test_inspect_browser.py)."""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch
from conftest import invoke

from textrnn.config import ModelConfig, TrainConfig
from textrnn.inspect import features, forward_states, inspect_text, report_html
from textrnn.model import RNNLanguageModel
from textrnn.sampling import Sampler
from textrnn.tokenizers import CharTokenizer

TEXT = 'def f(x):\n    return "a (b)" + g(x[0])\n' * 30


def brackets(seed: int, length: int) -> str:
    """Text whose only structure is nesting: ( ) to depth 4, around the letters a b c."""
    rng, out, depth = random.Random(seed), [], 0
    while len(out) < length:
        r = rng.random()
        if depth < 4 and r < 0.3:
            out.append("(")
            depth += 1
        elif depth > 0 and r < 0.55:
            out.append(")")
            depth -= 1
        else:
            out.append(rng.choice("abc"))
        if depth == 0 and rng.random() < 0.05:
            out.append("\n")
    return "".join(out) + ")" * depth + "\n"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_states_and_surprisal_are_the_models_own(cell):
    torch.manual_seed(0)
    tokenizer = CharTokenizer(TEXT)
    model = RNNLanguageModel(ModelConfig(cell=cell, num_layers=2, hidden_size=12, embedding_dim=8,
                                         vocab_size=tokenizer.vocab_size)).eval()
    ids = tokenizer.encode(TEXT)
    states = torch.cat([s for _, s in forward_states(model, ids, chunk=50)])  # chunks: the state must carry
    with torch.no_grad():
        x = model.embedding(torch.tensor([ids]))
        out, final = model.rnn(x)
    top_h = slice(24, 36) if cell == "lstm" else slice(12, 24)
    assert torch.allclose(states[:, top_h], out[0], atol=1e-5)
    if cell == "lstm":  # the recomputed cell states end where the fused LSTM's do, for both layers
        assert torch.allclose(states[-1, 12:24], final[1][0, 0], atol=1e-5)
        assert torch.allclose(states[-1, 36:48], final[1][1, 0], atol=1e-5)
    result = inspect_text(model, tokenizer, TEXT)
    scores = Sampler(model, tokenizer, "cpu", precision="fp32").score(TEXT)
    assert np.allclose(result.bits[1:], -np.array(scores.logprobs[1:]) / math.log(2), atol=1e-3)
    assert result.bits[0] == 0 and result.top_ids[0, 0] == -1 and len(result.units) == states.shape[1]
    best = result.top_probs[1:, 0]
    assert np.all(best >= result.top_probs[1:, 1]) and np.all(result.top_probs.sum(1) <= 1 + 1e-5)


def test_features_of_a_small_text():
    f = features('a ("b c")\n  d(e)\n')
    assert f["bracket depth"].tolist()[:10] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert f["inside quotes"].tolist()[2:9] == [0, 1, 1, 1, 1, 0, 0]
    assert f["position in line"].tolist()[9:14] == [0, 1, 2, 3, 4] and f["indentation"].tolist()[13] == 2
    assert f["word start"].tolist()[:6] == [1, 0, 0, 0, 1, 0]


def test_the_gallery_finds_a_planted_bracket_depth_unit(tmp_path):
    """A 1x16 LSTM trained for 80 steps on nested brackets (2 s) grows a unit that counts the depth:
    its |r| passes 0.7, and passes by 0.2 the best unit of the same model untrained (about 0.4 to
    0.5 here: depth goes with the current character, which even random units read)."""
    from textrnn.checkpoint import load_run
    from textrnn.training import train

    (tmp_path / "brackets.txt").write_text(brackets(0, 20_000))
    result = train([tmp_path / "brackets.txt"], tmp_path / "run",
                   ModelConfig(cell="lstm", num_layers=1, hidden_size=16, embedding_dim=8),
                   TrainConfig(max_steps=80, batch_size=16, seq_len=64, eval_every=80, lr=2e-2, warmup_steps=2,
                               device="cpu", seed=0), tokenizer="char")
    run = load_run(result.run_dir, torch.device("cpu"))
    sample = brackets(1, 3000)
    trained = {g["feature"]: g for g in inspect_text(run.model, run.tokenizer, sample).gallery}
    torch.manual_seed(0)
    untrained = RNNLanguageModel(run.model.config).eval()
    baseline = {g["feature"]: g for g in inspect_text(untrained, run.tokenizer, sample).gallery}
    depth = trained["bracket depth"]
    assert abs(depth["r"]) > 0.7 and abs(depth["r"]) > abs(baseline["bracket depth"]["r"]) + 0.2
    assert "inside quotes" not in trained  # no quote in the text: no such card
    # the unit really is the one named: its own correlation, recomputed from its activations
    states = inspect_text(run.model, run.tokenizer, sample).states[:, depth["column"]].astype(np.float64)
    assert abs(np.corrcoef(states, features(sample)["bracket depth"])[0, 1] - depth["r"]) < 1e-3
    shuffled = np.random.default_rng(0).permutation(features(sample)["bracket depth"])
    assert abs(np.corrcoef(states, shuffled)[0, 1]) < 0.1  # the shuffled baseline is near 0


def test_the_page_is_self_contained_with_compact_data():
    torch.manual_seed(0)
    tokenizer = CharTokenizer(TEXT + "<")
    model = RNNLanguageModel(ModelConfig(num_layers=1, hidden_size=8, embedding_dim=8,
                                         vocab_size=tokenizer.vocab_size)).eval()
    text = TEXT + "</script><"
    page = report_html(inspect_text(model, tokenizer, text), "t", state_chars=100)
    assert not re.search(r"(src|href)=\"?https?:", page) and "</script><" not in page.split("const DATA =")[1][:-30]
    data = json.loads(page.split("const DATA = ")[1].split(";\nconst $")[0])
    assert data["text"] == text and data["stateChars"] == 100
    assert len(data["states"]) == math.ceil(100 * 16 / 3) * 4  # int8, base64: 100 characters x 16 units


def test_the_command_writes_a_report_and_refuses_bad_input(tmp_path):
    from serve_helpers import make_run

    run_dir = make_run(tmp_path)
    (tmp_path / "sample.txt").write_text("to be or not to be, (that) is the question.\n" * 20)
    result = invoke("inspect", run_dir, tmp_path / "sample.txt", "--out", tmp_path / "r.html")
    assert result.code == 0, result.stderr
    assert "bits/char" in result.stdout and (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    for args, words in [((tmp_path / "missing.txt",), "missing.txt"),
                        ((tmp_path / "sample.txt", "--state-chars", "0"), "--state-chars")]:
        bad = invoke("inspect", run_dir, *args)
        assert bad.code == 2 and words in bad.stderr and "Traceback" not in bad.stderr


def test_characters_outside_the_vocabulary_are_not_scored_as_in_evaluate(tmp_path):
    """evaluate feeds them as the unknown id and leaves them out of the score; so does inspect
    (compared on one stream: evaluate_file splits a text into several, each from a zero state)."""
    from serve_helpers import make_run

    from textrnn.checkpoint import load_run
    from textrnn.evaluation import evaluate_ids
    from textrnn.inspect import inspect_file

    run_dir = make_run(tmp_path)
    text = "to be \u20ac or not to be\n"
    (tmp_path / "odd.txt").write_text(text)
    _, summary = inspect_file(run_dir, tmp_path / "odd.txt", tmp_path / "odd.html", device="cpu")
    run = load_run(run_dir, torch.device("cpu"))
    ids = run.tokenizer.encode_array(text, unknown="unk")
    loss, count = evaluate_ids(run.model, ids, seq_len=8, streams=1, device=run.device,
                               mask=ids != run.tokenizer.unk_id)
    assert count == len(text) - 2 and abs(summary["bpc"] - loss / count / math.log(2)) < 1e-4
