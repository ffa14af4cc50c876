"""Fine-tuning (``train --init-from RUN_DIR``): the base run, checked against the new run's settings,
and its weights copied into the new model, a char vocabulary's rows following their characters.

The new run is otherwise an ordinary run: ``training.py`` trains it with a fresh optimizer,
schedule and budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ModelConfig, finetune_model_config
from .data import Dataset
from .errors import CheckpointError, ConfigError
from .model import RNNLanguageModel
from .tokenizers import Tokenizer, describe_chars, load_tokenizer


@dataclass
class Base:
    """The run a fine-tuned run starts from (``init_from``)."""

    path: Path
    tokenizer: Tokenizer
    model_config: ModelConfig  # the new run's model: the base's, maybe with other dropout and weight drop


def read_base(path: Path, model_config: ModelConfig | None, data_settings: dict) -> Base:
    """The base run at ``path``, checked against the new run's settings: its model shape, tokenizer
    and vocabulary are kept, so settings that contradict them are refused (ConfigError)."""
    config = ckpt.run_config(path)  # a directory that is not a run: CheckpointError
    try:
        base_model = ModelConfig.from_dict(config["model"], str(path / ckpt.CONFIG_FILE))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    tokenizer = load_tokenizer(path)
    kind = data_settings["tokenizer"]
    if kind is not None and kind != tokenizer.kind:
        raise ConfigError(f"{path}: the base run has a {tokenizer.kind} tokenizer, which a fine-tuned run keeps "
                          f"(got tokenizer {kind}); drop --tokenizer")
    if data_settings["vocab_size"] is not None:
        raise ConfigError(f"{path}: a fine-tuned run keeps the base run's vocabulary; drop --vocab-size")
    model = finetune_model_config(base_model, model_config.to_dict() if model_config else {}, str(path))
    return Base(path.resolve(), tokenizer, model)


def check_base_tokenizer(base: Base, dataset: Dataset) -> None:
    """A preprocessed directory must have been encoded as the base's tokenizer would (char
    vocabularies may differ: their rows are mapped by character)."""
    mine = dataset.tokenizer
    if mine.kind != base.tokenizer.kind:
        raise ConfigError(f"{dataset.path}: preprocessed with a {mine.kind} tokenizer, but the base run "
                          f"{base.path} has a {base.tokenizer.kind} one; give the raw text instead")
    if getattr(mine, "model_proto", None) != getattr(base.tokenizer, "model_proto", None):
        raise ConfigError(f"{dataset.path}: preprocessed with another SentencePiece model than the base run "
                          f"{base.path}'s; give the raw text, so that it is encoded with the base's")


def base_record(base: Base, tokenizer: Tokenizer, log) -> dict:
    """What config.json keeps of the base (``info`` shows it), logged in one line."""
    evals = [r for r in ckpt.read_metrics(base.path) if r.get("kind") == "eval"]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else {}
    record = {"path": str(base.path), "step": best.get("step"), "val_loss": best.get("val_loss"),
              "tokenizer": base.tokenizer.kind}
    if tokenizer.kind == "char":
        added = sorted(base.tokenizer.unknown_chars("".join(tokenizer.chars)))
        record["added_chars"] = "".join(added)
        detail = (f"{len(added)} new character(s) added to its vocabulary of {base.tokenizer.vocab_size}"
                  + (f": {describe_chars(added)}" if added else ""))
    elif tokenizer.kind == "byte":
        detail = "byte tokenizer, nothing to map"
    else:
        detail = f"its {tokenizer.kind} tokenizer encodes the new text (pieces it cannot form as bytes)"
    log(f"starting from {base.path} (step {record['step']}, val loss "
        f"{'-' if best.get('val_loss') is None else format(best['val_loss'], '.4f')}): {detail}")
    return record


VOCABULARY_TENSORS = ("embedding.weight", "head.weight", "head.bias")  # one row per token id


def start_from_base(model: RNNLanguageModel, base_dir: Path, tokenizer: Tokenizer) -> None:
    """Copy the base run's best weights into a new model. A char vocabulary's rows follow their
    characters (the unknown id's row goes to the new unknown id); a character the base lacks
    starts from the mean of the base's character rows."""
    path = ckpt.weights_file(base_dir)  # best, or last/ for a base stopped before its first evaluation
    tensors = ckpt.load_tensors(path)
    if model.config.tie_weights:  # stored once, as the embedding
        tensors["head.weight"] = tensors["embedding.weight"]
    base_tokenizer = load_tokenizer(base_dir)
    if tokenizer.kind == "char":  # byte and SentencePiece ids mean what they meant: nothing to map
        index = {c: i for i, c in enumerate(base_tokenizer.chars)}
        rows = torch.tensor([index.get(c, -1) for c in tokenizer.chars] + [base_tokenizer.unk_id])  # (V,)
        known = rows >= 0
        characters = torch.arange(base_tokenizer.vocab_size) != base_tokenizer.unk_id  # (V_base,)
        for name in VOCABULARY_TENSORS:
            source = tensors[name]  # (V_base, ...) or (V_base,)
            if source.shape[0] != base_tokenizer.vocab_size:
                raise CheckpointError(f"{path}: {name} has {source.shape[0]} rows, the base's vocabulary "
                                      f"{base_tokenizer.vocab_size}")
            grown = source.new_empty((len(rows),) + tuple(source.shape[1:]))
            grown[known] = source[rows[known]]
            grown[~known] = source[characters].mean(0)
            tensors[name] = grown
    ckpt.check_weights(model, tensors, path)  # names, shapes, dtypes, finite
    model.load_state_dict(tensors)
