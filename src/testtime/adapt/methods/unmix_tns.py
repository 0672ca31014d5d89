"""UnMix-TNS: un-mixing test-time normalisation statistics.

Tomar, Vray, Thiran, Bozorgtabar. "Un-Mixing Test-Time Normalization Statistics: Combatting
Label Temporal Correlation." ICLR 2024.

Every BatchNorm layer keeps K statistics components (initialised from the source statistics
with a random perturbation); each instance is normalised with the mixture of the components
after mixing its own statistics into them by a soft assignment, and the components are updated
online (`components/norm_mixture.py::UnMixNorm`). No parameter is trained; this is the
standalone (norm-only) UnMix-TNS of the official code's `unmixtns` adapter.

| option | default | source |
| --- | --- | --- |
| num_components (K) | 16 | official code (`UNMIXTNS.NUM_COMPONENTS`), paper |
| base_momentum | 0.1 | official code (the BatchNorm layer's momentum) |
| batch_size_max | 64 | official code (`UNMIXTNS.BATCH_SIZE_MAX`) |
| temperature | 0.07 | official code |
| init_coeff (alpha) | 0.5 | official code |

Deviations:
- The momentum `1 - (1 - 0.1) ** (n / 64)` uses the size n of each batch; the official code uses
  the configured test batch size (identical for constant batch sizes).
- The initial perturbation is drawn from the method's seeded generator (`seed`), not the global RNG.
- A source model's BatchNorm1d layers (kept at source statistics in the official code) are not
  converted specially: every BatchNorm layer becomes an UnMix-TNS layer (our models have BatchNorm2d only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.norm import convert_norm
from testtime.adapt.components.norm_mixture import UnMixNorm
from testtime.adapt.components.norm_types import BN, BN_STATISTICS_WHY, NormSupport
from testtime.adapt.components.passes import Passes
from testtime.adapt.config import MethodConfig
from testtime.adapt.registry import register_method


@dataclass
class UnMixTNSConfig(MethodConfig):
    num_components: int = 16
    base_momentum: float = 0.1
    batch_size_max: int = 64
    temperature: float = 0.07
    init_coeff: float = 0.5

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("num_components", self.num_components >= 1, "must be >= 1"),
            ("base_momentum", 0 < self.base_momentum <= 1, "must be in (0, 1]"),
            ("batch_size_max", self.batch_size_max >= 1, "must be >= 1"),
            ("temperature", 0 < self.temperature < float("inf"), "must be a positive finite number"),
            ("init_coeff", 0 <= self.init_coeff < 1, "must be in [0, 1)"),
        ]


@register_method
class UnMixTNS(AdaptedModel):
    """BatchNorm statistics from K online-updated components mixed per instance; no training."""

    name = "unmix_tns"
    Config = UnMixTNSConfig
    paper = "Tomar et al., ICLR 2024"
    config: UnMixTNSConfig

    def setup(self) -> None:
        self.model.requires_grad_(False)
        c = self.config
        convert_norm(
            self.model,
            UnMixNorm,
            num_components=c.num_components,
            base_momentum=c.base_momentum,
            batch_size_max=c.batch_size_max,
            temperature=c.temperature,
            init_coeff=c.init_coeff,
            generator=self.rng,  # type: ignore[arg-type]
        )

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def minimal_passes(self) -> Passes:
        return Passes(1, 0, "one forward: the statistics components are mixed and updated inside it")

    norm_support = NormSupport(
        "none",
        "K-component mixture statistics",
        kinds=(BN,),
        why=BN_STATISTICS_WHY,
        source="paper: mixes BatchNorm statistics components",
    )
