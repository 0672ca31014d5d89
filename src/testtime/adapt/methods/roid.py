"""ROID: universal TTA by weight ensembling, diversity weighting and prior correction.

Marsden, Döbler, Yang. "Universal Test-time Adaptation through Weight Ensembling, Diversity
Weighting, and Prior Correction." WACV 2024.

BatchNorm layers use test-batch statistics and their affine parameters train (Adam). Each batch
is predicted by one forward pass; the loss is the soft likelihood ratio (SLR) of every sample,
weighted by `exp(diversity * certainty / T)` (both min-max normalised over the batch), with the
samples of below-mean diversity dropped; diversity is measured against an EMA (0.9) of the batch
mean softmax. A consistency term (symmetric CE between the kept samples and one augmented view,
same weights) is added. After each update the trainable weights are ensembled with the source
weights (`theta <- 0.99 theta + 0.01 theta_src`). The returned outputs are prior-corrected by the
smoothed batch label prior.

| option | default | source |
| --- | --- | --- |
| optimizer | adam (betas 0.9, 0.999), lr 1e-3, wd 0 | official repo, `cfgs/cifar10_c/roid.yaml` (batch 200) |
| use_weighting | True | official `conf.py` (`ROID.USE_WEIGHTING`) |
| use_prior_correction | True | official `conf.py` |
| use_consistency | True | official `conf.py` |
| momentum_src | 0.99 | official `conf.py` (`ROID.MOMENTUM_SRC`) |
| momentum_probs | 0.9 | official `conf.py` (`ROID.MOMENTUM_PROBS`) |
| temperature | 1/3 | official `conf.py` (`ROID.TEMPERATURE`) |
| slr_clip, slr_eps | 0.99, 1e-5 | official `SoftLikelihoodRatio` |

Deviations:
- The weighted loss sums are divided by the size of the current batch; the official code divides
  by the configured test batch size (identical when every batch has that size).
- Augmentation for the consistency loss: the official code uses CoTTA's pipeline without blur and
  noise and with reflect padding (`cotta_augs=False`); `components.augment.TTAAugment` (noise std
  0) still applies its mild Gaussian blur (sigma <= 0.5) and uses edge padding.
- Batch of one: with weighting on, the min-max normalised weights are undefined (0/0) for a single
  sample; the official code would back-propagate NaN. Here no gradient step is taken for such a
  batch (weight ensembling, the running class distribution and prior correction still apply).
- `use_weighting=False`: every sample is kept with weight 1 (the official code then refers to an
  undefined mask); the running class distribution is only tracked when weighting is on, as there.
- Backward passes are counted over the batch plus the augmented kept samples.
- As in the official code, prior correction multiplies the *logits* by the smoothed prior (about
  1/C), which leaves the ranking nearly intact but flattens the softmax: the returned outputs are
  for argmax decisions, their softmax is poorly calibrated (high NLL/Brier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from testtime.adapt.components.augment import TTAAugment
from testtime.adapt.components.consistency import (
    SourceWeights,
    certainty_diversity_weights,
    prior_correction,
    roid_checks,
)
from testtime.adapt.components.features import find_classifier
from testtime.adapt.components.losses import soft_likelihood_ratio, symmetric_cross_entropy
from testtime.adapt.components.norm_types import NORM_AFFINE
from testtime.adapt.components.passes import Passes, new_tally, per_image
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


@dataclass
class ROIDConfig(OptimConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    use_weighting: bool = True
    use_prior_correction: bool = True
    use_consistency: bool = True
    momentum_src: float = 0.99
    momentum_probs: float = 0.9
    temperature: float = 1 / 3
    slr_clip: float = 0.99
    slr_eps: float = 1e-5

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            *roid_checks(self),
        ]


@register_method
class ROID(GradientMethod):
    """Weighted soft-likelihood-ratio training of BN affines, ensembled with the source weights."""

    name = "roid"
    Config = ROIDConfig
    paper = "Marsden et al., WACV 2024"
    config: ROIDConfig

    def setup(self) -> None:
        _, fc = find_classifier(self.model)
        super().setup()
        self.source_weights = SourceWeights(self.params)
        self.register_buffer("class_probs_ema", torch.full((fc.out_features,), 1.0 / fc.out_features))
        self.augment = TTAAugment(gaussian_std=0.0)
        self.tally = new_tally()  # "consistency": kept samples whose augmented view was trained on

    def step(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        for _ in range(cfg.steps):
            logits = self.model(x)
            weights = torch.ones(n, device=x.device)
            keep = torch.ones(n, dtype=torch.bool, device=x.device)
            if cfg.use_weighting:
                weights, keep = certainty_diversity_weights(
                    logits.detach(), self.class_probs_ema, cfg.temperature
                )
                self.class_probs_ema.lerp_(logits.detach().float().softmax(1).mean(0), 1 - cfg.momentum_probs)
            if n > 1 or not cfg.use_weighting:  # weights are undefined for a single sample
                loss = (soft_likelihood_ratio(logits, cfg.slr_clip, cfg.slr_eps) * weights)[keep].sum() / n
                n_back = n
                if cfg.use_consistency:
                    aug = self.model(self.augment(x[keep], self.rng))
                    loss = loss + (symmetric_cross_entropy(aug, logits[keep]) * weights[keep]).sum() / n
                    n_back += aug.shape[0]
                    self.tally["consistency"] += aug.shape[0]
                self.backward_and_step(loss, n_back)
            self.source_weights.ensemble_(self.params, cfg.momentum_src)
        return prior_correction(logits) if cfg.use_prior_correction else logits

    def minimal_passes(self) -> Passes:
        s, aug = self.config.steps, per_image(self.n_images, self.tally["consistency"])
        return Passes(
            s + aug,
            s + aug,
            "per step one trained forward (loss, weights and prediction) and its backward; the "
            "consistency loss adds a trained forward + backward of augmented views of the kept "
            "(diverse) samples only",
        )

    norm_support = NORM_AFFINE
