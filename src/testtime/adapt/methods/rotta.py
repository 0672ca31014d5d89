"""RoTTA: robust test-time adaptation in dynamic scenarios.

Yuan, Xie, Li. "Robust Test-Time Adaptation in Dynamic Scenarios." CVPR 2023.

BatchNorm layers become robust BN: source statistics updated by an EMA (alpha = 0.05) of the
statistics of the batches the network is trained on, used unchanged for prediction. Every test
batch is predicted by the teacher (an EMA of the student, nu = 0.001); each sample enters a
category-balanced memory (CSTU) with its teacher pseudo-label and entropy. Every 64 samples the
student (BN affines, Adam) is trained on strongly augmented memory samples with the soft
cross-entropy to the teacher's prediction on the plain memory samples, each weighted by its
timeliness `exp(-a) / (1 + exp(-a))` (a = age / capacity); both networks update their robust-BN
statistics on that memory batch, then the teacher takes its EMA step. As in the official code
(train mode during the update), the student's robust-BN statistics move with the strongly
augmented memory batch and the teacher's with the plain one; test batches are predicted with the
teacher's stored statistics, unchanged.

| option | default | source |
| --- | --- | --- |
| optimizer | adam (betas 0.9, 0.999), lr 1e-3, wd 0 | official config / mariodoebler `cfgs/cifar10_c/rotta.yaml` |
| memory_size | 64 | paper / official config (`ROTTA.MEMORY_SIZE`) |
| update_frequency | 64 | official config (`ROTTA.UPDATE_FREQUENCY`) |
| nu (teacher EMA rate) | 0.001 | paper / official config (`ROTTA.NU`) |
| alpha (robust-BN momentum) | 0.05 | paper / official config (`ROTTA.ALPHA`) |
| lambda_t, lambda_u | 1.0, 1.0 | paper / official config |

Deviations:
- Strong augmentation is `components.augment.TTAAugment` (CoTTA's pipeline, as the official code),
  drawn from `self.rng`.
- The teacher's EMA step covers the trainable (BN affine) parameters only; the official code
  averages every parameter, but the frozen ones are identical in both networks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.adapt.components.augment import TTAAugment
from testtime.adapt.components.consistency import ema_, trainable_pairs
from testtime.adapt.components.features import find_classifier
from testtime.adapt.components.losses import cross_entropy_soft
from testtime.adapt.components.memory import CategoryBalancedMemory, timeliness_weights
from testtime.adapt.components.norm import EMAStatsNorm
from testtime.adapt.components.norm_types import NORM_AFFINE, REFERENCE
from testtime.adapt.components.passes import Passes, new_tally, per_image
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.teacher import frozen_copy
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


class RobustNorm(EMAStatsNorm):
    """Robust BN of RoTTA: EMA-updated statistics that gradients flow through; `frozen` layers
    normalise with the stored statistics and leave them unchanged (prediction)."""

    def __init__(self, bn: _BatchNorm, momentum: float) -> None:
        super().__init__(bn, momentum)
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return self.normalize(x, self.running_mean, self.running_var)
        mean, var = self.batch_moments(x)
        mean = torch.lerp(self.running_mean, mean, self.momentum)
        var = torch.lerp(self.running_var, var, self.momentum)
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps).view(shape)
        out = (x - mean.view(shape)) * scale
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


@contextmanager
def frozen_stats(*models: nn.Module) -> Iterator[None]:
    """Robust-BN layers of `models` normalise with their stored statistics and do not update them."""
    layers = [m for model in models for m in model.modules() if isinstance(m, RobustNorm)]
    for m in layers:
        m.frozen = True
    try:
        yield
    finally:
        for m in layers:
            m.frozen = False


@dataclass
class RoTTAConfig(OptimConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    memory_size: int = 64
    update_frequency: int = 64
    nu: float = 0.001
    alpha: float = 0.05
    lambda_t: float = 1.0
    lambda_u: float = 1.0

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("memory_size", self.memory_size >= 1, "must be >= 1"),
            ("update_frequency", self.update_frequency >= 1, "must be >= 1"),
            ("nu", 0 <= self.nu <= 1, "must be in [0, 1]"),
            ("alpha", 0 <= self.alpha <= 1, "must be in [0, 1]"),
            ("lambda_t", self.lambda_t >= 0, "must be >= 0"),
            ("lambda_u", self.lambda_u >= 0, "must be >= 0"),
        ]


@register_method
class RoTTA(GradientMethod):
    """Robust BN + category-balanced memory + timeliness-weighted mean teacher."""

    name = "rotta"
    Config = RoTTAConfig
    paper = "Yuan et al., CVPR 2023"
    norm_policy = RobustNorm
    config: RoTTAConfig

    def norm_kwargs(self) -> dict[str, float]:
        return {"momentum": self.config.alpha}

    def setup(self) -> None:
        _, fc = find_classifier(self.model)
        super().setup()
        self.teacher = frozen_copy(self.model)
        self.memory = CategoryBalancedMemory(
            self.config.memory_size, fc.out_features, self.config.lambda_t, self.config.lambda_u
        )
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.long))
        self.augment = TTAAugment()
        self.tally = new_tally()  # "replayed": memory samples trained on (summed over updates)

    def counted_networks(self) -> list[nn.Module]:
        return [self.model, self.teacher]

    def step(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), frozen_stats(self.teacher):
            logits = self.teacher(x)
        probs = logits.softmax(1)
        labels = probs.argmax(1).tolist()
        uncertainty = (-(probs * torch.log(probs + 1e-6)).sum(1)).tolist()
        for i in range(x.shape[0]):
            self.memory.add(x[i], labels[i], uncertainty[i])
            self.n_seen += 1
            if int(self.n_seen) % self.config.update_frequency == 0:
                self.update_model()
        return logits

    def minimal_passes(self) -> Passes:
        replayed = per_image(self.n_images, self.tally["replayed"])
        return Passes(
            1 + 2 * replayed,
            replayed,
            "one no-grad teacher forward per test image (prediction, memory pseudo-label); every "
            "update_frequency images a teacher forward of the memory (targets) and a trained student "
            "forward + backward of its augmented copy",
        )

    def update_model(self) -> None:
        data, ages = self.memory.contents()
        if len(data):
            with torch.no_grad():
                target = self.teacher(data)
            student = self.model(self.augment(data, self.rng))
            loss = (cross_entropy_soft(student, target) * timeliness_weights(ages)).mean()
            self.backward_and_step(loss, len(data))
            self.tally["replayed"] += len(data)
        ema_(*trainable_pairs(self.teacher, self.model), 1 - self.config.nu)

    norm_support = replace(
        NORM_AFFINE,
        bn_stats="robust BN (EMA of batch statistics)",
        source=f"{REFERENCE}: rotta `configure_model` replaces BN layers by robust BN and trains LN/GN affine",
    )
