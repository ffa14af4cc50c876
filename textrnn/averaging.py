"""An exponential moving average of the weights (``--ema DECAY``): what a run evaluates, keeps as its
best weights and samples from, while the optimizer goes on updating the model's own weights.

The average lives beside the model as fp32 copies, one per parameter. It is saved in ``last/`` for
an exact resume, and the weights ``generate`` loads are the average's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError


class WeightAverage:
    """After optimizer step ``t`` the average moves toward the weights by ``1 - d`` with
    ``d = min(decay, (1 + t) / (10 + t))``, so that the first steps are not averaged with the
    random initial weights for long."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        named = list(model.named_parameters())  # a tied head is one parameter, named once
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.average = [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0 for the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, self.params, 1.0 - decay)  # one fused call per step

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, and its own ones again after."""
        with torch.no_grad():
            own = [param.detach().clone() for param in self.params]
            for param, average in zip(self.params, self.average):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, own):
                    param.copy_(saved)

    def copy(self) -> list[torch.Tensor]:
        return [average.clone() for average in self.average]

    def put_back(self, saved: list[torch.Tensor]) -> None:
        self.average = saved

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average as a state dict of the model (the format of ``model.safetensors``)."""
        return dict(zip(self.names, self.average))

    def load(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        if set(tensors) != set(self.names):
            raise CheckpointError(f"{path}: the weight average does not match the model")
        for index, name in enumerate(self.names):
            tensor = tensors[name]
            if tensor.shape != self.average[index].shape or tensor.dtype != self.average[index].dtype:
                raise CheckpointError(f"{path}: {name} of the weight average is {tuple(tensor.shape)} "
                                      f"{tensor.dtype}; the model's is {tuple(self.average[index].shape)} "
                                      f"{self.average[index].dtype}")
            self.average[index] = tensor.to(self.average[index].device).clone()
