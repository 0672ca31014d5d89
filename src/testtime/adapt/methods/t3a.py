"""T3A: test-time template adjuster.

Iwasawa, Matsuo. "Test-Time Classifier Adjustment Module for Model-Agnostic Domain
Generalization." NeurIPS 2021.

The feature extractor and classifier are frozen (source BatchNorm statistics). The classifier is
replaced by class prototypes built from a support set: it starts with the rows of the linear
classifier's weight (each labelled by the class the classifier assigns to it), and every test
feature joins it under its pseudo-label (argmax of the frozen classifier) with the entropy of
that prediction; only the `filter_k` lowest-entropy supports per class are kept. Prototypes are
the normalised sums of the normalised supports; logits are `features @ prototypes.T`. The
batch is predicted after its own features have been added, as in the official code.

| option | default | source |
| --- | --- | --- |
| filter_k | 100 | paper selects M from {1, 5, 20, 50, 100, all} on validation data; 100 is its largest finite choice |

Deviations:
- `filter_k=-1` (keep every support) is not offered: the support set has a fixed capacity
  (`filter_k` per class) so that `reset()`/`state_dict()` capture it.
- Efficiency: features and pseudo-labels come from one forward pass (the official code runs the
  featurizer and the classifier separately, to the same effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.feature_memory import ClassSupportSet
from testtime.adapt.components.features import FeatureTap
from testtime.adapt.components.losses import entropy
from testtime.adapt.components.norm_types import FROZEN
from testtime.adapt.components.passes import Passes
from testtime.adapt.config import MethodConfig
from testtime.adapt.registry import register_method


@dataclass
class T3AConfig(MethodConfig):
    filter_k: int = 100

    def checks(self) -> list[tuple[str, bool, str]]:
        return [*super().checks(), ("filter_k", self.filter_k >= 1, "must be >= 1")]


@register_method
class T3A(AdaptedModel):
    """Prototype classifier from the lowest-entropy pseudo-labelled test features per class."""

    name = "t3a"
    Config = T3AConfig
    paper = "Iwasawa & Matsuo, NeurIPS 2021"
    config: T3AConfig

    def setup(self) -> None:
        self.model.requires_grad_(False)
        self.tap = FeatureTap(self.model)
        fc = self.tap.classifier
        self.supports = ClassSupportSet(fc.out_features, self.config.filter_k, fc.in_features).to(
            fc.weight.device
        )
        with torch.no_grad():
            w = fc.weight.detach().float()
            warm = fc(w)  # the classifier's view of its own weight rows
            self.supports.add(w, warm.argmax(1), entropy(warm))

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        feats, logits = self.tap(self.model, x)
        self.supports.add(feats, logits.argmax(1), entropy(logits))
        return feats @ self.supports.prototypes().T

    def minimal_passes(self) -> Passes:
        return Passes(1, 0, "one forward gives features and pseudo-labels; prototypes are updated from them")

    norm_support = FROZEN
