"""Shared method skeletons: a norm policy + trainable-parameter selection + optimiser."""

from __future__ import annotations

from typing import Any, ClassVar

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.norm import AdaptiveNorm, BatchStatsNorm
from testtime.adapt.components.norm_types import NORM_AFFINE, NormSupport, convert_batchnorm
from testtime.adapt.components.optim import build_optimizer
from testtime.adapt.components.params import select_params
from testtime.adapt.config import OptimConfig


class GradientMethod(AdaptedModel):
    """A method that normalises with `norm_policy`, trains `trainable` parameters with an optimiser.

    `norm_policy` applies to BatchNorm layers; GroupNorm/LayerNorm layers keep normalising each
    sample by itself (their affine parameters are among the `"norm"` parameters). Subclasses set
    the class attributes and implement `step`.
    """

    norm_policy: ClassVar[type[AdaptiveNorm] | None] = BatchStatsNorm
    trainable: ClassVar[str] = "norm"  # see components.params.PARAM_SELECTORS
    # the statement for the defaults above (BN: batch statistics; norm affine train on BN/GN/LN);
    # a subclass that changes `trainable` or `norm_policy` states its own
    norm_support: ClassVar[NormSupport | None] = NORM_AFFINE
    config: OptimConfig

    def norm_kwargs(self) -> dict[str, Any]:
        return {}

    def setup(self) -> None:
        if self.norm_policy is not None:
            convert_batchnorm(self.model, self.norm_policy, **self.norm_kwargs())
        self.params = select_params(self.model, self.trainable)
        self.optimizer = build_optimizer(self.params, self.config)

    def step_batch(self, x: Any) -> Any:  # pragma: no cover - documented alias
        return self.step(x)
