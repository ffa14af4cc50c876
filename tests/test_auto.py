"""``--preset auto`` fitted to the user's corpus: the rule from token counts alone, what a run
records and shows of it, and flags that keep their own value."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, sentence_corpus
from textrnn.config import AUTO_WIDE, PRESETS, TrainConfig, auto_regularisation, auto_shape, preset

DEFAULT_BATCH = TrainConfig().batch_size * TrainConfig().seq_len  # tokens a step reads
TWO_MINUTES, TEN_MINUTES = 1718, 8569  # steps of the 2x256 default on this CPU (BENCHMARKS.md)


@pytest.mark.parametrize("corpus_chars, steps, dropout, weight_drop", [
    (100_000, TWO_MINUTES, 0.35, 0.2),  # a letter collection: read 39 times in two minutes, memorised
    (100_000, TEN_MINUTES, 0.35, 0.2),  # 195 times
    (300_000, TWO_MINUTES, 0.15, 0.0),  # 13 epochs
    (300_000, TEN_MINUTES, 0.35, 0.0),  # 65 epochs, but three times the text of the first rows: no DropConnect
    (1_115_394, TWO_MINUTES, 0.05, 0.0),  # tiny Shakespeare: under 4 epochs, the tuned default
    (1_115_394, TEN_MINUTES, 0.15, 0.0),  # 17 epochs of a million tokens
    (4_700_000, TEN_MINUTES, 0.05, 0.0),  # the Python standard library: 4 epochs of 4.2 million
    (100_000, 150, 0.05, 0.0),  # a small corpus read only three times: nothing to memorise yet
])
def test_the_rule_follows_the_table_from_token_counts(corpus_chars, steps, dropout, weight_drop):
    train_tokens = int(corpus_chars * 0.9)  # the default validation fraction
    epochs = steps * DEFAULT_BATCH / train_tokens
    chosen = auto_regularisation(epochs, train_tokens, floor=preset("small").dropout)
    assert chosen == {"dropout": dropout, "weight_drop": weight_drop}


def test_the_wide_model_at_30_minutes_keeps_its_dropout():
    # The 2x384 on tiny Shakespeare, 9,765 steps on one core: 20 epochs. It has half the text per
    # weight of the 2x256, but was best at its preset's 0.15 (1.3817 and 1.3797, 0.23: 1.3910).
    train_tokens = int(1_115_394 * 0.9)
    chosen = auto_regularisation(9_765 * DEFAULT_BATCH / train_tokens, train_tokens, floor=AUTO_WIDE["dropout"])
    assert chosen == {"dropout": 0.15, "weight_drop": 0.0}


@pytest.mark.parametrize("minutes, corpus_chars, hidden", [
    (10, 4_500_000, 384),  # Python and the GNU manuals, 4 million tokens read 4 times: the 2x384 is ahead or level
    (10, 1_115_394, 256),  # tiny Shakespeare: a million tokens, the 2x256 at 10 minutes
    (2, 4_500_000, 256),  # two minutes are too few steps for the 2x384 on any text
    (30, 100_000, 384),  # from 20 minutes the budget alone calls for it
])
def test_the_width_follows_the_table_from_token_counts(minutes, corpus_chars, hidden):
    shape = auto_shape(minutes * 60.0, int(corpus_chars * 0.9))
    assert shape["hidden_size"] == hidden and shape == (AUTO_WIDE if hidden == 384 else PRESETS["small"])
    assert auto_shape(None, 10**9) == PRESETS["small"]  # a step budget: the time to use a wide model is unknown


def test_a_large_corpus_widens_the_model_unless_a_shape_is_given(tmp_path, monkeypatch):
    import textrnn.config

    # a few thousand tokens stand for the 2 million of the rule, so that the run is small
    monkeypatch.setattr(textrnn.config, "AUTO_WIDE_TEXT", (600.0, 1_000))
    corpus = tmp_path / "manual.txt"
    corpus.write_text(sentence_corpus(("the cat sat on the mat. ", "copy the file to the disk. "), 3_000),
                      encoding="utf-8")
    quick = ("--max-time", "10m", "--max-steps", "2", "--eval-tokens", "200", "--threads", "1",
             "--sample-length", "0", "--seq-len", "16", "--batch-size", "4")
    result = invoke("train", corpus, "--out", tmp_path / "wide", *quick)
    assert result.code == 0, result.stderr
    config = _config(tmp_path / "wide")
    assert (config["model"]["hidden_size"], config["model"]["dropout"]) == (384, 0.15)
    assert config["auto"]["shape"] == "2x384" and config["auto"]["chose"]["hidden_size"] == 384
    assert "auto: 2x384 for" in result.stderr and "training tokens in 10m" in result.stderr
    for name, flags in (("hidden", ("--hidden", "256")), ("layers", ("--layers", "1")), ("named", ("--preset", "small"))):
        kept = invoke("train", corpus, "--out", tmp_path / name, *quick, *flags)
        assert kept.code == 0, kept.stderr
        assert _config(tmp_path / name)["model"]["hidden_size"] == 256, name
    given = invoke("train", corpus, "--out", tmp_path / "dropout", *quick, "--dropout", "0.02")
    assert given.code == 0 and _config(tmp_path / "dropout")["model"]["dropout"] == 0.02  # wider, the dropout kept


def test_the_rule_is_monotone_and_bounded():
    epochs_grid = [0.01 * 1.3 ** k for k in range(40)]
    tokens_grid = [1_000 * 1.3 ** k for k in range(40)]
    for tokens in tokens_grid:
        dropouts = [auto_regularisation(epochs, tokens)["dropout"] for epochs in epochs_grid]
        assert dropouts == sorted(dropouts)  # more epochs, never less dropout
    for epochs in epochs_grid:
        dropouts = [auto_regularisation(epochs, tokens)["dropout"] for tokens in tokens_grid]
        assert dropouts == sorted(dropouts, reverse=True)  # more text, never more
    assert auto_regularisation(1000, 1_000) == {"dropout": 0.35, "weight_drop": 0.2}
    assert auto_regularisation(0.1, 10**8)["dropout"] == 0.05
    assert auto_regularisation(0.1, 10**8, floor=0.15)["dropout"] == 0.15


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("auto") / "letters.txt"
    path.write_text(sentence_corpus(("dear ann, the rain came in. ", "we met the cat at ten. "), 4_000),
                    encoding="utf-8")
    return path


TINY = ("--layers", "1", "--hidden", "16", "--embed", "8", "--seq-len", "16", "--batch-size", "4",
        "--threads", "1", "--precision", "fp32", "--sample-length", "0")


def _config(run) -> dict:
    return json.loads((run / "config.json").read_text())


def test_a_run_records_what_auto_chose_and_why(small_corpus, tmp_path):
    steps = 60  # 60 x 4 x 16 tokens over about 3,600: 16 epochs
    result = invoke("train", small_corpus, "--out", tmp_path / "run", "--max-steps", str(steps), *TINY)
    assert result.code == 0, result.stderr
    config = _config(tmp_path / "run")
    train_tokens = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["splits"]["train"]["tokens"]
    epochs = steps * 4 * 16 / train_tokens
    assert config["auto"]["planned_epochs"] == pytest.approx(epochs, abs=0.01)
    assert config["auto"]["train_tokens"] == train_tokens
    rule = auto_regularisation(epochs, train_tokens, floor=0.05)
    assert config["auto"]["chose"] == rule
    assert {k: config["model"][k] for k in ("dropout", "weight_drop")} == rule
    assert "auto: the plan reads the" in result.stderr and "times" in result.stderr  # the log's one line
    shown = invoke("info", tmp_path / "run")
    assert shown.code == 0 and "auto       the plan reads the" in shown.stdout


def test_flags_and_named_presets_keep_their_values(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text(sentence_corpus(("we met the cat at ten. ",), 200), encoding="utf-8")
    many = ("--max-steps", "200")  # 70 epochs of 180 tokens: dropout 0.35, weight drop 0.2
    given = invoke("train", corpus, "--out", tmp_path / "given", *many, "--dropout", "0.1", *TINY)
    assert given.code == 0, given.stderr
    config = _config(tmp_path / "given")
    assert config["model"]["dropout"] == 0.1 and config["model"]["weight_drop"] == 0.2
    assert config["auto"]["chose"] == {"weight_drop": 0.2}
    named = invoke("train", corpus, "--out", tmp_path / "named", *many, "--preset", "small", *TINY)
    assert named.code == 0, named.stderr
    config = _config(tmp_path / "named")
    assert config["model"]["dropout"] == 0.05 and config["auto"] == {"fit": []}

