"""The quality benchmark's peers: the char-rnn recipe scores every validation character once,
follows char-rnn's defaults, and reports each shorter budget of one run; the GPT baseline too."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines.charrnn import CharRNN, CharRNNConfig, _evaluate, train_charrnn  # noqa: E402
from bench.baselines.gpt import train_baseline  # noqa: E402
from bench.quality import charrnn_at  # noqa: E402
from conftest import sentence_corpus  # noqa: E402

TEXT = sentence_corpus(("the cat sat on the mat. ", "a dog ran to the log. ", "we met at ten. "), 6_000)


def test_charrnn_model_has_the_recipes_shape_and_initialisation():
    torch.manual_seed(0)
    model = CharRNN(30, CharRNNConfig())
    assert model.lstm.num_layers == 2 and model.lstm.hidden_size == 128 and model.lstm.input_size == 30
    forget = model.lstm.bias_ih_l0[128:256]
    assert torch.all(forget == 1.0)
    others = torch.cat([p.flatten() for n, p in model.named_parameters() if n not in ("lstm.bias_ih_l0", "lstm.bias_ih_l1")])
    assert others.abs().max() <= 0.08


@pytest.mark.parametrize("length", [2_000, 2_037])  # a multiple of the 50 streams plus one, and not
def test_charrnn_evaluation_scores_every_target_once(length):
    torch.manual_seed(0)
    model = CharRNN(5, CharRNNConfig(rnn_size=8))
    stream = torch.randint(0, 5, (length,))
    loss = _evaluate(model, stream, seq_length=50)  # asserts its own count
    with torch.no_grad():  # an untrained model: close to uniform over 5 symbols
        assert abs(loss - torch.log(torch.tensor(5.0)).item()) < 0.2


def test_charrnn_reports_each_budget_of_one_run():
    rows = train_charrnn(TEXT, minutes=0.05, eval_every_seconds=100, eval_at_minutes=[0.02],
                         config=CharRNNConfig(rnn_size=16, batch_size=10, seq_length=20), log=lambda m: None)
    assert len(rows) == 2  # at the 0.02-minute mark and at the end
    assert rows[0]["minutes"] >= 0.02 and rows[-1]["minutes"] >= 0.05
    assert rows[0]["step"] < rows[-1]["step"]
    # learned within its budget; that the later row is lower is not promised: the clock, not the
    # step count, sets both rows, and this corpus is learned to its floor within a second
    assert rows[-1]["val_loss"] < math.log(len(set(TEXT))) - 0.5
    assert charrnn_at(rows, 0.02) == rows[:1] and charrnn_at(rows, 0.05) == rows


def test_gpt_baseline_learns_within_its_budget():
    rows = train_baseline(TEXT, minutes=0.05, eval_every_seconds=100, log=lambda m: None)
    assert rows and rows[-1]["minutes"] >= 0.05 and rows[-1]["val_loss"] < 3.0
