"""Fine-tuning with ``init_from`` and the samples written at each evaluation.

A fine-tuned run starts from its base's weights: a char vocabulary grows by one block of new
characters while every known character keeps its rows bit for bit; byte and SentencePiece bases
map nothing. Settings that contradict the base are refused with one line and exit code 2.
Samples land in samples.jsonl at each evaluation, repeat for a seed, show in ``info``, and leave
training bit for bit as it is without them; ``generate --weights last`` reads ``last/``. Tiny
models on CPU, fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import invoke, sentence_corpus
from textrnn import checkpoint as ckpt
from textrnn.config import ModelConfig, TrainConfig
from textrnn.sampling import Sampler
from textrnn.schedule import Costs
from textrnn.tokenizers import load_tokenizer
from textrnn.training import Interrupted, train

BASE_SENTENCES = ("the cat sat on the mat. ", "a dog ran to the log.\n", "no hen is in the pen. ")
NEW_SENTENCES = ("the caf\u00e9 sat on the mat. ", "ZEBRA ran to the log!\n", "no hen is in the pen? ")


def tiny_model(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(cell="lstm", num_layers=1, hidden_size=24, embedding_dim=16, dropout=0.1),
                          **overrides})


def tiny_train(**overrides) -> TrainConfig:
    settings = dict(seq_len=16, batch_size=8, lr=1e-2, warmup_steps=2, max_steps=12, eval_every=4, log_every=2,
                    seed=3, device="cpu", precision="fp32", sample_length=30)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    paths = {"base": root / "base.txt", "new": root / "new.txt"}
    paths["base"].write_text(sentence_corpus(BASE_SENTENCES, 5000), encoding="utf-8")
    paths["new"].write_text(sentence_corpus(NEW_SENTENCES, 5000, seed=1), encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def char_base(tmp_path_factory, texts) -> Path:
    run = tmp_path_factory.mktemp("runs") / "char-base"
    train([texts["base"]], run, tiny_model(), tiny_train())
    return run


def _step_zero(base: Path, text: Path, out: Path) -> Path:
    """A fine-tuned run stopped before its first step: its saved weights are where it started."""
    with pytest.raises(Interrupted):
        train([text], out, None, tiny_train(), init_from=base, should_stop=lambda step: step == 0)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_tensors(run / ckpt.WEIGHTS_FILE)


# ---------------------------------------------------------------- init_from

def test_char_vocabulary_grows_by_one_block_and_known_rows_are_kept(tmp_path, char_base, texts):
    logs: list[str] = []
    run = tmp_path / "grown"
    with pytest.raises(Interrupted):
        train([texts["new"]], run, None, tiny_train(), init_from=char_base, log=logs.append,
              should_stop=lambda step: step == 0)
    old, new = load_tokenizer(char_base), load_tokenizer(run)
    added = sorted(set(texts["new"].read_text(encoding="utf-8")) - set(old.chars))
    assert new.chars == old.chars + added and new.unk_id == new.vocab_size - 1  # one block; unknown id last
    assert [line for line in logs if f"{len(added)} new character(s) added" in line and "'Z'" in line]
    before, after = _weights(char_base), _weights(run)
    for name in ("embedding.weight", "head.weight", "head.bias"):
        for index, char in enumerate(old.chars):  # by character, bit for bit
            assert torch.equal(after[name][new.chars.index(char)], before[name][index]), (name, char)
        assert torch.equal(after[name][new.unk_id], before[name][old.unk_id])
        for char in added:  # the mean of the base's character rows
            expected = before[name][:old.unk_id].mean(0)
            assert torch.equal(after[name][new.chars.index(char)], expected), (name, char)
    for name in before.keys() - {"embedding.weight", "head.weight", "head.bias"}:
        assert torch.equal(after[name], before[name]), name
    config = json.loads((run / "config.json").read_text())
    assert config["init_from"]["path"] == str(char_base.resolve())
    assert config["init_from"]["added_chars"] == "".join(added)
    assert config["model"] == {**json.loads((char_base / "config.json").read_text())["model"],
                               "vocab_size": new.vocab_size}


def test_fine_tuning_trains_on_the_new_text_from_a_fresh_start(tmp_path, char_base, texts):
    result = train([texts["new"]], tmp_path / "tuned", None, tiny_train(max_steps=16), init_from=char_base)
    state = json.loads((tmp_path / "tuned" / "last" / "state.json").read_text())
    assert result.step == 16 and state["plan"] == 16  # its own step count and plan, not the base's
    losses = [r["loss"] for r in ckpt.read_metrics(tmp_path / "tuned") if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    out = invoke("info", tmp_path / "tuned")
    assert out.code == 0 and f"fine-tuned from {char_base.resolve()}" in out.stdout


def test_byte_base_maps_nothing(tmp_path, texts):
    base = tmp_path / "byte-base"
    train([texts["base"]], base, tiny_model(), tiny_train(max_steps=4), tokenizer="byte")
    run = _step_zero(base, texts["new"], tmp_path / "byte-tuned")
    assert load_tokenizer(run).kind == "byte"
    before, after = _weights(base), _weights(run)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sentencepiece_base_encodes_the_new_text_as_it_is(tmp_path, texts):
    base = tmp_path / "bpe-base"
    train([texts["base"]], base, tiny_model(), tiny_train(max_steps=4), tokenizer="bpe", vocab_size=300)
    run = _step_zero(base, texts["new"], tmp_path / "bpe-tuned")
    assert (run / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    tokenizer = load_tokenizer(run)
    assert tokenizer.decode(tokenizer.encode("caf\u00e9 ZEBRA!")) == "caf\u00e9 ZEBRA!"  # unseen: byte pieces
    before, after = _weights(base), _weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_init_from_in_a_toml_file(tmp_path, char_base, texts):
    config = tmp_path / "tune.toml"
    config.write_text(f'init_from = "{char_base}"\n[train]\nmax_steps = 4\nbatch_size = 8\nseq_len = 16\n'
                      f'device = "cpu"\nsample_length = 0\n', encoding="utf-8")
    out = invoke("train", texts["new"], "--config", config, "--out", tmp_path / "toml-tuned", "--dropout", "0.0",
                 "--weight-drop", "0.3")
    assert out.code == 0, out.stderr
    saved = json.loads((tmp_path / "toml-tuned" / "config.json").read_text())
    assert saved["init_from"]["path"] == str(char_base.resolve())
    assert saved["model"]["hidden_size"] == 24  # the shape is the base's; the regularisation may change
    assert saved["model"]["dropout"] == 0.0 and saved["model"]["weight_drop"] == 0.3


@pytest.mark.parametrize("flags, words", [
    (["--resume", "{base}"], "--resume"),
    (["--hidden", "32"], "hidden_size 32"),
    (["--layers", "2"], "num_layers 2"),
    (["--cell", "gru"], "cell 'gru'"),
    (["--embed", "8"], "embedding_dim 8"),
    (["--preset", "tiny"], "hidden_size 128"),
    (["--tokenizer", "byte"], "char tokenizer"),
], ids=["resume", "hidden", "layers", "cell", "embed", "preset", "tokenizer"])
def test_refusals_are_one_line_and_exit_2(tmp_path, char_base, texts, flags, words):
    flags = [f.format(base=char_base) for f in flags]
    out = invoke("train", texts["new"], "--init-from", char_base, "--out", tmp_path / "refused", *flags)
    assert out.code == 2 and out.stderr.startswith("error: ") and words in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p / "missing"], ids=["not-a-run", "missing"])
def test_a_base_that_is_not_a_run_is_refused(tmp_path, texts, make):
    out = invoke("train", texts["new"], "--init-from", make(tmp_path), "--out", tmp_path / "refused")
    assert out.code == 2 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- samples at each evaluation

def test_samples_at_each_evaluation_repeat_for_a_seed_and_show_in_info(tmp_path, texts):
    for name in ("a", "b"):
        train([texts["base"]], tmp_path / name, tiny_model(), tiny_train())
    rows = ckpt.read_metrics(tmp_path / "a", ckpt.SAMPLES_FILE)
    evals = [r for r in ckpt.read_metrics(tmp_path / "a") if r["kind"] == "eval"]
    assert [r["step"] for r in rows] == [r["step"] for r in evals] == [4, 8, 12]
    first_line = load_tokenizer(tmp_path / "a").decode(
        np.fromfile(tmp_path / "a" / "data" / "val.bin", dtype=np.uint8)[:200].tolist()).split("\n")[0] + "\n"
    for row, evaluation in zip(rows, evals):
        assert set(row) == {"step", "elapsed", "val_loss", "prompt", "temperature", "text"}
        assert row["val_loss"] == evaluation["val_loss"] and row["temperature"] == 0.8
        assert row["prompt"] == first_line and len(row["text"]) == 30
    assert [r["text"] for r in rows] == [r["text"] for r in ckpt.read_metrics(tmp_path / "b", ckpt.SAMPLES_FILE)]
    out = invoke("info", tmp_path / "a")
    assert out.code == 0 and "sample     at step 12" in out.stdout
    assert rows[-1]["text"].split("\n")[0] in out.stdout


def test_sample_length_0_writes_no_samples(tmp_path, texts):
    out = invoke("train", texts["base"], "--out", tmp_path / "quiet", "--layers", "1", "--hidden", "16",
                 "--embed", "8", "--max-steps", "4", "--eval-every", "2", "--batch-size", "8", "--seq-len", "16",
                 "--device", "cpu", "--sample-length", "0")
    assert out.code == 0, out.stderr
    assert not (tmp_path / "quiet" / ckpt.SAMPLES_FILE).exists() and "sample:" not in out.stderr


def test_sample_prompt_outside_the_vocabulary_is_refused(tmp_path, texts):
    out = invoke("train", texts["base"], "--out", tmp_path / "bad", "--max-steps", "2", "--device", "cpu",
                 "--layers", "1", "--hidden", "16", "--embed", "8", "--sample-prompt", "\u65e5")
    assert out.code == 2 and "sample prompt" in out.stderr and not (tmp_path / "bad").exists()


def test_samples_leave_training_bit_for_bit_the_same(tmp_path, texts):
    """Dropout on: sampling must not draw from training's generator or leave the model in eval mode."""
    train([texts["base"]], tmp_path / "with", tiny_model(), tiny_train(sample_prompt="the "))
    train([texts["base"]], tmp_path / "without", tiny_model(), tiny_train(sample_length=0))
    for name in ("last/model.safetensors", "last/optimizer.safetensors", "model.safetensors"):
        a, b = ckpt.load_tensors(tmp_path / "with" / name), ckpt.load_tensors(tmp_path / "without" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r for r in ckpt.read_metrics(tmp_path / "with") if r["kind"] == "train"] != []
    keys = ("step", "loss", "grad_norm")
    rows = [[[r[k] for k in keys] for r in ckpt.read_metrics(tmp_path / run) if r["kind"] == "train"]
            for run in ("with", "without")]
    assert rows[0] == rows[1]


def test_resume_drops_samples_past_the_checkpoint_and_repeats_them(tmp_path, texts):
    run = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train([texts["base"]], run, tiny_model(), tiny_train(), should_stop=lambda step: step == 6)
    ckpt.append_metrics(run, {"step": 7, "text": "written after the checkpoint"}, ckpt.SAMPLES_FILE)
    train(resume=run)
    train([texts["base"]], tmp_path / "straight", tiny_model(), tiny_train())
    texts_of = [[(r["step"], r["text"]) for r in ckpt.read_metrics(p, ckpt.SAMPLES_FILE)]
                for p in (run, tmp_path / "straight")]
    assert texts_of[0] == texts_of[1]


def test_an_evaluation_in_the_plan_costs_its_sample():
    costs = Costs(step=0.1, eval_token=1e-4, save=0.2, finish=1.0, sample=0.05)
    assert costs.evaluation(1000) == pytest.approx(0.1 + 0.05)
    assert Costs(**{k: v for k, v in costs.__dict__.items() if k != "sample"}).evaluation(1000) == \
        pytest.approx(0.1)  # a state.json from before samples


def test_generate_can_use_the_last_weights(tmp_path, char_base):
    run = tmp_path / "run"
    shutil.copytree(char_base, run)
    last = {k: v + 0.5 for k, v in ckpt.load_tensors(run / "last" / ckpt.WEIGHTS_FILE).items()}
    ckpt.save_tensors(run / "last" / ckpt.WEIGHTS_FILE, last)  # unlike the best weights
    model = Sampler.from_checkpoint(run, device="cpu", engine="torch", weights="last").model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in last.items())
    texts = [invoke("generate", "-c", run, "--weights", weights, "--length", "40", "--seed", "1", "--engine", "torch",
                    "--prompt", "the ").stdout for weights in ("best", "last")]
    assert texts[0].startswith("the ") and texts[1].startswith("the ") and texts[0] != texts[1]
