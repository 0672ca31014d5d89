"""Source: the unadapted model, normalising with its training statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.norm import SourceNorm, batchnorm_layers, convert_norm
from testtime.adapt.components.norm_types import FROZEN
from testtime.adapt.components.passes import Passes
from testtime.adapt.config import MethodConfig
from testtime.adapt.registry import register_method


@dataclass
class SourceConfig(MethodConfig):
    guard: bool = False  # nothing adapts, nothing can collapse


@register_method
class Source(AdaptedModel):
    """No adaptation: the baseline every method is compared with."""

    name = "source"
    keeps_state = False
    Config = SourceConfig
    paper = "-"

    def setup(self) -> None:
        self.model.requires_grad_(False)
        if batchnorm_layers(self.model):
            convert_norm(self.model, SourceNorm)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def minimal_passes(self) -> Passes:
        return Passes(1, 0, "one inference forward")

    norm_support = FROZEN
