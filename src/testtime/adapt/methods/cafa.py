"""CAFA: class-aware feature alignment.

Jung, Lee, Kim, Shaban, Boots, Choo. "CAFA: Class-Aware Feature Alignment for Test-Time
Adaptation." ICCV 2023 (CVPR 2023 workshop version; arXiv:2206.00205).

Before adaptation, class-conditional Gaussians of the penultimate features (per-class means and
covariances) are computed once from labelled source samples with the source model. At test time
BatchNorm layers use test-batch statistics and their affine parameters are trained to minimise,
per sample, log( D(x; mu_yhat, S_yhat) / sum_c D(x; mu_c, S_c) ), where D is the squared
Mahalanobis distance and yhat the predicted class: features move towards the source Gaussian of
their predicted class (intra-class) and away from the others (inter-class). Predictions are those
of the forward pass used for the loss.

Source statistics reach the method as `source_data` (labelled images, e.g.
`adapt(model, "cafa", source_data=load_cifar10("train"))`) or as a file written by
`components/source_stats.py::ClassFeatureStats.save` (`stats_path=...`).

| option | default | source |
| --- | --- | --- |
| optimizer, lr | adam, 1e-3 | paper follows Tent's CIFAR protocol |
| covariance | class | paper (class-conditional Gaussians, one covariance per class) |
| cov_eps | 1e-4 | ours: ridge (times the mean variance) so every covariance is invertible |
| steps | 1 | paper (online) |
| stats_path | "" | ours: precomputed statistics instead of `source_data` |
| source_batch_size | 500 | ours: chunk size for the source feature pass |

Deviations:
- No official implementation was found in the search index; the loss follows the paper's
  description. A small ridge `cov_eps` is added to the covariances before inversion.
- `covariance="shared"` (one pooled covariance) is offered as an option, not the default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from testtime.adapt.components.features import FeatureTap
from testtime.adapt.components.norm_types import NORM_AFFINE
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.source_stats import (
    ClassFeatureStats,
    class_feature_stats,
    extract_features,
    mahalanobis,
    regularised_inverse,
)
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method
from testtime.errors import DataError


def class_aware_alignment_loss(dist: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per-sample log(intra-class distance / sum of distances to all classes), from (N, C) distances."""
    intra = dist.gather(1, pred[:, None]).squeeze(1)
    return intra.clamp_min(1e-12).log() - dist.sum(1).clamp_min(1e-12).log()


@dataclass
class CAFAConfig(OptimConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    covariance: str = "class"
    cov_eps: float = 1e-4
    stats_path: str = ""
    source_batch_size: int = 500

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("covariance", self.covariance in ("class", "shared"), "must be 'class' or 'shared'"),
            ("cov_eps", 0 <= self.cov_eps < float("inf"), "must be a finite number >= 0"),
            ("source_batch_size", self.source_batch_size >= 1, "must be >= 1"),
        ]


@register_method
class CAFA(GradientMethod):
    """Mahalanobis alignment of test features to per-class source Gaussians; BN affine trained."""

    name = "cafa"
    Config = CAFAConfig
    paper = "Jung et al., ICCV 2023"
    paper_source_samples: ClassVar[int] = 50_000  # statistics of the whole CIFAR training set
    requires_source_data: ClassVar[bool] = True  # construction fails without source statistics
    config: CAFAConfig

    def setup(self) -> None:
        self.tap = FeatureTap(self.model)
        stats = self.source_statistics()  # with the source model, before the norm policy changes
        num_classes, dim = self.tap.classifier.out_features, self.tap.classifier.in_features
        if stats.means.shape != (num_classes, dim):
            raise DataError(
                f"cafa: source statistics have means of shape {tuple(stats.means.shape)}, "
                f"the model needs ({num_classes}, {dim})"
            )
        self.register_buffer("class_means", stats.means)
        self.register_buffer("class_precisions", regularised_inverse(stats.covs, self.config.cov_eps))
        super().setup()

    def source_statistics(self) -> ClassFeatureStats:
        c = self.config
        if c.stats_path:
            stats = ClassFeatureStats.load(c.stats_path)
            if stats.shared != (c.covariance == "shared"):
                raise DataError(f"cafa: {c.stats_path} does not hold {c.covariance!r} covariances")
            return stats
        if self.source_data is None:
            raise DataError(
                "cafa needs labelled source samples: adapt(model, 'cafa', source_data=(images, labels)) "
                "or a statistics file via stats_path=..."
            )
        x, y = self.source_data
        with torch.no_grad():
            feats, _ = extract_features(self.model.eval(), self.tap, x, c.source_batch_size)
        return class_feature_stats(feats, y, self.tap.classifier.out_features, c.covariance)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.config.steps):
            feats, logits = self.tap(self.model, x)
            dist = mahalanobis(feats, self.class_means, self.class_precisions)
            loss = class_aware_alignment_loss(dist, logits.argmax(1).detach()).mean()
            self.backward_and_step(loss, x.shape[0])
        return logits

    def minimal_passes(self) -> Passes:
        s = self.config.steps
        return Passes(s, s, "per step one forward gives features, pseudo-labels and prediction; one backward")

    norm_support = replace(
        NORM_AFFINE, source="ours: Tent's parameterisation (CAFA follows Tent), so GN/LN affine as Tent"
    )
