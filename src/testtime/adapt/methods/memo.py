"""MEMO: test-time robustness via adaptation and augmentation (marginal entropy minimisation).

Zhang, Levine, Finn. "MEMO: Test Time Robustness via Adaptation and Augmentation." NeurIPS 2022.

Episodic and per sample: for every test image, `n_augmentations` AugMix views are drawn
(`components.augmix.AugMix`, MEMO's CIFAR augmentation), all parameters take one SGD step that
minimises the entropy of the prediction averaged over the views (the marginal entropy), the
adapted model predicts the original image, and the weights are restored to the source weights
before the next image. BatchNorm layers normalise with the source statistics mixed with the
statistics of the current input, `prior = N / (N + 1)` for prior strength `N` (the official BN
treatment: the estimate is a constant for the gradient, variance unbiased), both when adapting on
the views and when predicting the single test image.

| option | default | source |
| --- | --- | --- |
| optimizer | sgd (no momentum, no weight decay) | official CIFAR-10 code (`test_adapt.py`) |
| lr | 0.005 | official CIFAR-10 code (ResNet-26) |
| n_augmentations | 32 | official CIFAR-10 code (`--batch_size 32`) |
| steps | 1 | official code (`--niter 1`) |
| prior_strength | 16 | official code for BatchNorm models (`--prior_strength 16`) |
| severity, width, max_depth | 1, 3, 3 | official AugMix settings (`third_party.py`) |

Deviations:
- The official CIFAR-10 model uses GroupNorm, so its CIFAR script has no BatchNorm prior; the
  prior (N = 16) is the one the official code uses for BatchNorm networks (ImageNet ResNet-50),
  applied here because the model has BatchNorm. Its ImageNet learning rate (0.00025, batch 64)
  is not used: we keep the CIFAR-10 learning rate and view count.
- AugMix is re-implemented in torch (`components.augmix`), random numbers from `self.rng`;
  geometric operations match PIL up to one grey level (bilinear truncation) and edge handling.
- Efficiency: the weights are restored in place from the source snapshot instead of reloading a
  checkpoint for every image; the optimiser state is cleared (SGD without momentum keeps none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.adapt.components.augmix import AugMix
from testtime.adapt.components.losses import marginal_entropy
from testtime.adapt.components.norm import MixedStatsNorm, convert_norm
from testtime.adapt.components.norm_types import NormSupport
from testtime.adapt.components.optim import build_optimizer
from testtime.adapt.components.params import select_params
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


@dataclass
class MEMOConfig(OptimConfig):
    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.0
    n_augmentations: int = 32
    prior_strength: float = 16.0
    severity: float = 1.0
    width: int = 3
    max_depth: int = 3
    guard: bool = False  # episodic: every image starts from the source model

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("n_augmentations", self.n_augmentations >= 2, "must be >= 2 (marginal over views)"),
            (
                "prior_strength",
                math.isfinite(self.prior_strength) and self.prior_strength >= 0,
                "must be >= 0",
            ),
            ("severity", 0.1 <= self.severity <= 10, "must be in [0.1, 10]"),
            ("width", self.width >= 1, "must be >= 1"),
            ("max_depth", self.max_depth >= 1, "must be >= 1"),
        ]


class PriorStatsNorm(MixedStatsNorm):
    """MEMO's BatchNorm: `prior * source + (1 - prior) * input` statistics, the input's estimate
    (unbiased variance) treated as a constant, as in the official `_modified_bn_forward`."""

    def batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=self.reduce_dims(x), correction=1)
        return mean, var


@register_method
class MEMO(GradientMethod):
    """Per-sample, episodic marginal-entropy minimisation over AugMix views."""

    name = "memo"
    keeps_state = False  # restored to the source after every image; only the random stream runs on
    Config = MEMOConfig
    paper = "Zhang et al., NeurIPS 2022"
    norm_support = NormSupport(
        "all",
        "source/test prior mix (N=16)",
        needs_norm=False,
        source="official CIFAR-10 code: a GroupNorm ResNet-26, all weights train, no prior",
    )
    trainable = "all"
    norm_policy = None
    config: MEMOConfig

    def setup(self) -> None:
        cfg = self.config
        if any(isinstance(m, _BatchNorm) for m in self.model.modules()):
            convert_norm(self.model, PriorStatsNorm, alpha=cfg.prior_strength / (cfg.prior_strength + 1))
        self.params = select_params(self.model, self.trainable)
        self.optimizer = build_optimizer(self.params, cfg)
        self.augment = AugMix(severity=cfg.severity, width=cfg.width, max_depth=cfg.max_depth)
        self.param_names = [f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def restore_weights(self) -> None:
        """Back to the source weights (episodic); the random generator keeps running."""
        source = self._snapshot["module"]
        for name, p in zip(self.param_names, self.params):
            p.copy_(source[name])
        self.optimizer.state.clear()

    def adapt_one(self, image: torch.Tensor) -> torch.Tensor:
        """Adapt on views of one (C, H, W) image, predict it, restore the weights; returns (1, K)."""
        for _ in range(self.config.steps):
            views = self.augment(image, self.config.n_augmentations, self.rng).to(image.device)
            self.backward_and_step(marginal_entropy(self.model(views)), len(views))
        with torch.no_grad():
            logits = self.model(image.unsqueeze(0))
        self.restore_weights()
        return logits

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.adapt_one(img) for img in x])

    def minimal_passes(self) -> Passes:
        views = self.config.steps * self.config.n_augmentations
        return Passes(
            views + 1,
            views,
            "per image and step a forward and backward of every augmented view, then one forward "
            "of the image with the updated weights (the prediction)",
        )
