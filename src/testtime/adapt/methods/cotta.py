"""CoTTA: continual test-time adaptation with a mean teacher and stochastic restoration.

Wang, Fink, Van Gool, Dai. "Continual Test-Time Domain Adaptation." CVPR 2022.

All parameters of the student train (BatchNorm with test-batch statistics). An EMA teacher
(momentum 0.999) gives the pseudo-labels: its prediction on the batch, or — when the frozen source
anchor's mean max-probability is below the threshold — its prediction averaged over 32 augmented
copies of the batch. The student minimises the soft cross-entropy to the teacher (Adam), the
teacher is updated by EMA, and every trainable weight element is reset to its source value with
probability 0.01. The returned prediction is the teacher's.

| option | default | source |
| --- | --- | --- |
| optimizer | adam (betas 0.9, 0.999), lr 1e-3, wd 0 | paper / official CIFAR-10-C config (batch 200) |
| steps | 1 | official config |
| ema_momentum | 0.999 | paper / official CIFAR-10-C config (`MT`) |
| restore_prob | 0.01 | paper / official CIFAR-10-C config (`RST`) |
| anchor_threshold | 0.92 | official CIFAR-10-C config (`AP`) |
| n_augment | 32 | paper / official code (`N = 32`) |
| episodic | False | official config |

Deviations:
- Efficiency: the official code always runs the teacher on the plain batch and on the 32
  augmented copies, then keeps only one of the two; here only the pass that is used runs.
- Augmentations are `components.augment.TTAAugment` (a torch re-implementation of the official
  torchvision pipeline; one random parameter set per call, as the original), drawn from `self.rng`.
- Restoration masks are drawn from `self.rng` (part of the adapted state, so `reset()` replays
  them); the official code uses the global torch RNG. As there, the teacher and the anchor are
  copies of the prepared student, so they too normalise with test-batch statistics.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from testtime.adapt.components.augment import TTAAugment
from testtime.adapt.components.losses import cross_entropy_soft
from testtime.adapt.components.norm_types import ALL_WEIGHTS
from testtime.adapt.components.passes import Passes, new_tally, per_image
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.teacher import ema_update, frozen_copy, stochastic_restore
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


@dataclass
class CoTTAConfig(OptimConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    ema_momentum: float = 0.999
    restore_prob: float = 0.01
    anchor_threshold: float = 0.92
    n_augment: int = 32
    episodic: bool = False

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("ema_momentum", 0 <= self.ema_momentum <= 1, "must be in [0, 1]"),
            ("restore_prob", 0 <= self.restore_prob <= 1, "must be in [0, 1]"),
            ("anchor_threshold", 0 <= self.anchor_threshold <= 1, "must be in [0, 1]"),
            ("n_augment", self.n_augment >= 1, "must be >= 1"),
        ]


class AugmentedTeacherMixin:
    """Teacher pseudo-labels of CoTTA/PETAL: plain, or augmentation-averaged when the anchor is unsure."""

    model: nn.Module
    teacher: nn.Module
    anchor: nn.Module
    rng: torch.Generator
    augment: TTAAugment
    n_images: torch.Tensor
    tally: Counter[str]
    TEACHER_WHY = (
        "per step one trained student forward and one backward, one no-grad anchor forward (its "
        "confidence decides), then either one teacher forward or, when the anchor is unsure, "
        "teacher forwards of n_augment augmented views (never both)"
    )

    def build_teacher_and_anchor(self) -> None:
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)
        self.augment = TTAAugment()
        self.tally = new_tally()  # "augmented": images whose pseudo-labels averaged augmented views

    def counted_networks(self) -> list[nn.Module]:
        return [self.model, self.teacher, self.anchor]

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, threshold: float, n_augment: int) -> torch.Tensor:
        """Teacher logits; averaged over `n_augment` augmentations if anchor confidence < threshold."""
        confidence = self.anchor(x).softmax(1).amax(1).mean()
        if confidence >= threshold:
            return self.teacher(x)
        self.tally["augmented"] += x.shape[0]
        return torch.stack([self.teacher(self.augment(x, self.rng)) for _ in range(n_augment)]).mean(0)

    def teacher_passes(self, steps: int, n_augment: int) -> float:
        """Forward passes per image of the teacher and the anchor over `steps` steps."""
        return 2 * steps + (n_augment - 1) * per_image(self.n_images, self.tally["augmented"])


@register_method
class CoTTA(AugmentedTeacherMixin, GradientMethod):
    """Mean teacher with augmentation-averaged pseudo-labels and stochastic restoration."""

    name = "cotta"
    Config = CoTTAConfig
    paper = "Wang et al., CVPR 2022"
    trainable = "all"
    config: CoTTAConfig

    def setup(self) -> None:
        super().setup()
        self.build_teacher_and_anchor()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.episodic:
            self.reset()
        source = dict(self.anchor.named_parameters())
        for _ in range(cfg.steps):
            student = self.model(x)
            target = self.teacher_logits(x, cfg.anchor_threshold, cfg.n_augment)
            self.backward_and_step(cross_entropy_soft(student, target).mean(), x.shape[0])
            ema_update(self.teacher, self.model, cfg.ema_momentum)
            stochastic_restore(self.model, source, cfg.restore_prob, self.rng)
        return target

    def minimal_passes(self) -> Passes:
        s = self.config.steps
        return Passes(s + self.teacher_passes(s, self.config.n_augment), s, self.TEACHER_WHY)

    norm_support = ALL_WEIGHTS
