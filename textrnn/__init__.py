"""textrnn: character-level RNN language models on PyTorch.

The public API: ``Sampler`` to generate text from a run, ``train`` to make one, ``load_run``
to load its model and tokenizer. Imports are lazy so that ``import textrnn`` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Sampler", "load_run", "train", "load_tokenizer", "TextRNNError", "__version__"]

from .errors import TextRNNError


def __getattr__(name: str):
    if name == "Sampler":
        from .sampling import Sampler

        return Sampler
    if name == "load_run":
        from .checkpoint import load_run

        return load_run
    if name == "train":
        from .training import train

        return train
    if name == "load_tokenizer":
        from .tokenizers import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'textrnn' has no attribute {name!r}")
