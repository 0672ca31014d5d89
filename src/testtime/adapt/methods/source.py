"""Source: the unadapted model, normalising with its training statistics."""

from __future__ import annotations

import torch

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.norm import SourceNorm, batchnorm_layers, convert_norm
from testtime.adapt.registry import register_method


@register_method
class Source(AdaptedModel):
    """No adaptation: the baseline every method is compared with."""

    name = "source"
    paper = "-"

    def setup(self) -> None:
        self.model.requires_grad_(False)
        if batchnorm_layers(self.model):
            convert_norm(self.model, SourceNorm)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
