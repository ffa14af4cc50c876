"""RNNLanguageModel: initialisation, shapes, weight tying and parameter counts."""

from __future__ import annotations

import pytest
import torch

from textrnn.config import CELLS, PRESETS, ModelConfig, count_parameters, preset
from textrnn.model import RNNLanguageModel, detach_state

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def tiny(cell: str = "lstm", **overrides) -> ModelConfig:
    settings = dict(vocab_size=23, cell=cell, num_layers=2, hidden_size=16, embedding_dim=12, dropout=0.0)
    return ModelConfig(**{**settings, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_lstm_forget_gate_bias_is_one():
    model = RNNLanguageModel(tiny("lstm"))
    hidden = model.config.hidden_size
    for layer in range(model.config.num_layers):
        total = getattr(model.rnn, f"bias_ih_l{layer}") + getattr(model.rnn, f"bias_hh_l{layer}")
        # PyTorch's gate order is (input, forget, cell, output): the forget block alone is 1
        torch.testing.assert_close(total[hidden:2 * hidden], torch.ones(hidden))
        torch.testing.assert_close(total[:hidden], torch.zeros(hidden))
        torch.testing.assert_close(total[2 * hidden:], torch.zeros(2 * hidden))


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_weights_are_orthogonal_per_gate_block(cell):
    model = RNNLanguageModel(tiny(cell))
    hidden = model.config.hidden_size
    for layer in range(model.config.num_layers):
        weight = getattr(model.rnn, f"weight_hh_l{layer}").detach()
        assert weight.shape == (GATES[cell] * hidden, hidden)
        for block in weight.split(hidden):  # one square block per gate
            torch.testing.assert_close(block @ block.T, torch.eye(hidden), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_and_init_state_shapes(cell):
    config = tiny(cell, num_layers=3)
    model = RNNLanguageModel(config)
    state = model.init_state(5)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (3, 5, 16) and not s.any() for s in state)
    ids = torch.randint(0, config.vocab_size, (5, 7))
    logits, new_state = model(ids, state)
    assert logits.shape == (5, 7, config.vocab_size)  # (B, T, V)
    assert [s.shape for s in new_state] == [s.shape for s in state]
    # no state means a fresh one
    torch.testing.assert_close(model(ids)[0], logits)
    assert all(not s.requires_grad for s in detach_state(new_state))


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_across_windows(cell):
    """Two windows fed with the carried state give the logits of one long window."""
    model = RNNLanguageModel(tiny(cell)).eval()
    ids = torch.randint(0, 23, (2, 10))
    whole, _ = model(ids)
    first, state = model(ids[:, :4])
    second, _ = model(ids[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("embedding_dim", [16, 12])
def test_tied_weights(embedding_dim):
    """Tying shares one tensor; hidden != embedding works through a bias-free projection."""
    config = tiny(embedding_dim=embedding_dim, tie_weights=True)
    model = RNNLanguageModel(config)
    assert model.head.weight is model.embedding.weight
    if embedding_dim != config.hidden_size:
        assert model.projection.weight.shape == (embedding_dim, config.hidden_size)
        assert model.projection.bias is None
    else:
        assert isinstance(model.projection, torch.nn.Identity)
    logits, _ = model(torch.randint(0, 23, (3, 5)))
    assert logits.shape == (3, 5, 23)
    logits.sum().backward()  # the shared matrix gets gradient from both uses
    assert model.embedding.weight.grad is not None and model.embedding.weight.grad.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_config(monkeypatch, name, cell, tie):
    # building a preset is cheap without the orthogonal init (QR of 1024x1024 blocks)
    monkeypatch.setattr(RNNLanguageModel, "_init_weights", lambda self: None)
    config = preset(name, cell=cell, vocab_size=65, tie_weights=tie)
    model = RNNLanguageModel(config)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config) == count_parameters(config, 65)


def test_preset_sizes_grow():
    counts = [count_parameters(preset(name), 65) for name in ("tiny", "small", "medium", "large")]
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_model_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        RNNLanguageModel(ModelConfig(vocab_size=0, hidden_size=8, embedding_dim=8))


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_only_in_training(cell):
    model = RNNLanguageModel(tiny(cell, dropout=0.5))
    ids = torch.randint(0, 23, (2, 6))
    model.eval()
    torch.testing.assert_close(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_masks_recurrent_weights_in_training_only(cell):
    """DropConnect: in training, each window draws one mask over the hidden-to-hidden matrices (the
    gradient of a dropped weight is zero); in eval the model is the plain one, its weights untouched."""
    model = RNNLanguageModel(tiny(cell, weight_drop=0.5))
    plain = RNNLanguageModel(tiny(cell))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 23, (3, 7))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    first, second = model(ids)[0], model(ids)[0]
    assert not torch.equal(first, second)
    first.sum().backward()
    for k in range(2):
        grad = getattr(model.rnn, f"weight_hh_l{k}").grad
        dropped = (grad == 0).float().mean().item()
        assert 0.3 < dropped < 0.7, (k, dropped)
        assert getattr(model.rnn, f"weight_ih_l{k}").grad.ne(0).float().mean() > 0.9  # inputs are not masked
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # a mask never writes the weights
    assert all(isinstance(p, torch.nn.Parameter) for p in model.rnn._flat_weights)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(ids)[0], plain(ids)[0], rtol=0, atol=0)
