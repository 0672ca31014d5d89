"""BN-adapt: normalise with test-batch statistics.

Schneider, Rusak, Eck, Bringmann, Brendel, Bethge. "Improving robustness against common
corruptions by covariate shift adaptation." NeurIPS 2020 (also Nado et al. 2020,
"prediction-time batch normalization").

| option | default | meaning |
| --- | --- | --- |
| prior_n | 0 | N of the source prior: stats = N/(N+n) source + n/(N+n) batch; 0 = batch stats only |

Deviations: none. `prior_n=0` is the full-adaptation setting used as the BN baseline by Tent and CoTTA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.norm import BatchStatsNorm, MixedStatsNorm, convert_norm
from testtime.adapt.components.norm_types import BN, BN_STATISTICS_WHY, NormSupport
from testtime.adapt.components.passes import Passes
from testtime.adapt.config import MethodConfig
from testtime.adapt.registry import register_method


@dataclass
class BNConfig(MethodConfig):
    prior_n: int = 0
    guard: bool = False  # statistics of each batch alone: no state accumulates

    def checks(self) -> list[tuple[str, bool, str]]:
        return [*super().checks(), ("prior_n", self.prior_n >= 0, "must be >= 0")]


@register_method
class BNAdapt(AdaptedModel):
    """BatchNorm layers normalise with the test batch's statistics; no parameter changes."""

    name = "bn"
    keeps_state = False
    Config = BNConfig
    paper = "Schneider et al., NeurIPS 2020"
    config: BNConfig

    def setup(self) -> None:
        self.model.requires_grad_(False)
        if self.config.prior_n:
            convert_norm(self.model, MixedStatsNorm, prior_n=self.config.prior_n)
        else:
            convert_norm(self.model, BatchStatsNorm)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def minimal_passes(self) -> Passes:
        return Passes(1, 0, "one forward: each layer's batch statistics come from the same pass")

    norm_support = NormSupport(
        "none",
        "test-batch statistics",
        kinds=(BN,),
        why=BN_STATISTICS_WHY,
        source="paper: re-estimates the BatchNorm statistics, nothing else",
    )
