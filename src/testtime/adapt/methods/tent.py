"""Tent: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-Time Adaptation by Entropy
Minimization." ICLR 2021.

Normalise with test-batch statistics; minimise the mean prediction entropy of each batch with
respect to the BatchNorm affine parameters only; predictions are those of the forward pass
used for the loss (made before the update).

| option | default | source |
| --- | --- | --- |
| optimizer | adam | paper, CIFAR experiments |
| lr | 1e-3 | paper, CIFAR experiments (batch 128; the continual protocol of CoTTA uses 200) |
| beta1, beta2 | 0.9, 0.999 | official code |
| weight_decay | 0 | official code |
| steps | 1 | paper |
| episodic | False | paper (online); True resets before every batch |

Deviations: none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testtime.adapt.components.losses import entropy
from testtime.adapt.components.norm_types import NORM_AFFINE
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


@dataclass
class TentConfig(OptimConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    episodic: bool = False


@register_method
class Tent(GradientMethod):
    """Entropy minimisation of the BatchNorm affine parameters, batch statistics."""

    name = "tent"
    Config = TentConfig
    paper = "Wang et al., ICLR 2021"
    config: TentConfig

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.episodic:
            self.reset()
        for _ in range(self.config.steps):
            logits = self.model(x)
            self.backward_and_step(entropy(logits).mean(), x.shape[0])
        return logits

    def minimal_passes(self) -> Passes:
        s = self.config.steps
        return Passes(s, s, "per step one forward gives the loss (and the prediction), one backward")

    norm_support = NORM_AFFINE
