"""Access to penultimate features and the linear classifier of a wrapped model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from testtime.errors import ModelError


def find_classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The final linear layer (by `name`, else the last nn.Linear registered in the model)."""
    if name is not None:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{type(model).__name__} has no submodule {name!r}") from None
        if not isinstance(m, nn.Linear):
            raise ModelError(f"{name!r} is a {type(m).__name__}, not nn.Linear")
        return name, m
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier; this method needs one")
    return linears[-1]


class FeatureTap:
    """Records the input of the classifier (the penultimate features) on every forward pass."""

    def __init__(self, model: nn.Module, classifier: str | None = None) -> None:
        self.name, self.classifier = find_classifier(model, classifier)
        self.features: torch.Tensor | None = None
        self._handle = self.classifier.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) from one forward pass of `model`."""
        logits = model(x)
        if self.features is None or self.features.shape[0] != x.shape[0]:
            raise ModelError("classifier input was not observed; is the classifier applied to every sample?")
        feats, self.features = self.features, None
        return feats.flatten(1), logits

    def remove(self) -> None:
        self._handle.remove()
