"""alpha-BN (and the Core loss): test-time batch statistics calibration.

You, Li, Zhao. "Test-time Batch Statistics Calibration for Covariate Shift." arXiv:2110.04065, 2021.

Every BatchNorm layer normalises with `alpha * source + (1 - alpha) * batch` statistics
(`components/norm.py::MixedStatsNorm`), without training. With `core=True` the paper's Core
framework additionally trains the BatchNorm affine parameters online with a pairwise class
correlation loss on each batch's predictions: with P the (B, C) softmax outputs and
M = P^T P row-normalised, the loss is the mean off-diagonal mass (1/C) sum_{i != j} M_ij,
i.e. it pushes classes to be uncorrelated across the batch. Predictions are those of the forward
pass used for the loss.

| option | default | source |
| --- | --- | --- |
| alpha | 0.9 (source weight) | paper; same mix as `BN.ALPHA=0.1` (test weight) of the widely used AlphaBatchNorm code |
| core | False | alpha-BN alone is the paper's training-free method; Core is its optional extension |
| optimizer, lr | adam, 1e-3 | assumed from the Tent protocol the paper follows for CIFAR (Core only) |
| steps | 1 | online, one update per batch (Core only) |
| guard | False | nothing accumulates without Core (like `bn`); with `core=True` set `guard=True` to watch the training |

Deviations:
- No official implementation was found; the Core loss is reconstructed from the paper's
  description ("pairwise class correlation online optimization") and its optimiser settings are
  assumed (Tent's). Treat `core=True` as unverified against the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from testtime.adapt.components.norm import MixedStatsNorm, convert_norm
from testtime.adapt.components.norm_mixture import GradMixedStatsNorm
from testtime.adapt.components.norm_types import BN, BN_STATISTICS_WHY, NormSupport
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


def class_correlation_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal mass of the row-normalised class correlation matrix P^T P of a batch."""
    p = logits.softmax(1)
    corr = p.T @ p
    corr = corr / corr.sum(1, keepdim=True).clamp_min(1e-12)
    c = corr.shape[0]
    return (corr.sum() - corr.diagonal().sum()) / c


@dataclass
class AlphaBNConfig(OptimConfig):
    alpha: float = 0.9
    core: bool = False
    guard: bool = False  # no state accumulates unless core=True
    optimizer: str = "adam"
    lr: float = 1e-3

    def checks(self) -> list[tuple[str, bool, str]]:
        return [*super().checks(), ("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]")]


@register_method
class AlphaBN(GradientMethod):
    """Source/test statistics mixed with weight alpha; optionally the Core class-correlation loss."""

    name = "alpha_bn"
    keeps_state = False  # without the Core loss nothing is trained
    Config = AlphaBNConfig
    paper = "You et al., arXiv 2021"
    norm_policy = MixedStatsNorm
    config: AlphaBNConfig

    def norm_kwargs(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha}

    def setup(self) -> None:
        if self.config.core:
            self.norm_policy = GradMixedStatsNorm  # trains through the mixed statistics
            super().setup()
        else:
            self.model.requires_grad_(False)
            convert_norm(self.model, MixedStatsNorm, **self.norm_kwargs())

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if not self.config.core:
            with torch.no_grad():
                return self.model(x)
        for _ in range(self.config.steps):
            logits = self.model(x)
            self.backward_and_step(class_correlation_loss(logits), x.shape[0])
        return logits

    def minimal_passes(self) -> Passes:
        if not self.config.core:
            return Passes(1, 0, "one forward with the mixed statistics")
        s = self.config.steps
        return Passes(s, s, "Core: per step one forward (loss and prediction) and one backward")

    norm_support = NormSupport(
        "none",
        "alpha-mix of source and test-batch statistics",
        kinds=(BN,),
        note="core=True: BN affine",
        why=BN_STATISTICS_WHY,
        source="paper: calibrates BatchNorm statistics",
    )
