"""RMT: robust mean teacher for continual and gradual test-time adaptation.

Döbler, Marsden, Yang. "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation."
CVPR 2023.

All parameters of the student train (BatchNorm with test-batch statistics; Adam), with an EMA
teacher (momentum 0.999). The student sees each batch and one augmented copy; the loss is the
symmetric cross-entropy of both student predictions to the teacher's (0.25 per direction and
view), plus a contrastive loss (SupCon "all" mode, temperature 0.1, through a 2-layer projector
trained alongside) that pulls together, per test sample, its feature, its augmented feature and
its nearest (cosine) source class prototype. The returned prediction is student + teacher logits.

Source data (`adapt(..., source_data=(x, y))` or an ImageSet): when given, the official setting
runs — class prototypes are the mean source features, the mean teacher is warmed up on
`warmup_samples` source samples (symmetric CE student/teacher, linear learning-rate ramp) before
any test data, and every update adds the cross-entropy on a random labelled source batch
(`lambda_ce_src`). Without source data (the default, source-free variant): no warm-up, no replay,
and the prototypes are the rows of the classifier's weight matrix (the class directions of the
feature space the classifier was trained on).

| option | default | source |
| --- | --- | --- |
| optimizer | adam (betas 0.9, 0.999), lr 1e-3, wd 0 | official `cfgs/cifar10_c/rmt.yaml` (batch 200) |
| ema_momentum | 0.999 | official `conf.py` (`M_TEACHER.MOMENTUM`) |
| lambda_ce_trg | 1.0 | official `conf.py` (`RMT.LAMBDA_CE_TRG`) |
| lambda_cont | 1.0 | official `conf.py` (`RMT.LAMBDA_CONT`) |
| lambda_ce_src | 1.0 (used only with source data) | official `conf.py` (`RMT.LAMBDA_CE_SRC`) |
| warmup_samples | 50000 (used only with source data) | official `conf.py` (`RMT.NUM_SAMPLES_WARM_UP`) |
| source_batch_size | 200 | official: its source loader uses the test batch size (200 for CIFAR-10-C); here the warm-up and prototype batch size, replay batches match the current test batch |
| temperature | 0.1 | official `conf.py` (`CONTRAST.TEMPERATURE`) |
| projection_dim | 128 | official `conf.py` (`CONTRAST.PROJECTION_DIM`) |
| max_prototype_samples | 100000 | official code (feature extraction stops past 100k samples) |

Deviations:
- Source-free prototypes: the official code always computes prototypes from source data (its
  "source-free" variant only sets `LAMBDA_CE_SRC 0`); without source data we use the classifier
  weights as prototypes.
- Source batches are drawn uniformly at random (with `self.rng`) for each warm-up/replay step
  instead of iterating a shuffled loader epoch by epoch.
- Augmentations are `components.augment.TTAAugment` (CoTTA's pipeline, as the official code).
- With source data, a class without any source sample gets the classifier weight row as its
  prototype (the official mean over an empty set would be NaN).
- One combined backward for the target and replay losses (the official code runs two backward
  passes before one optimiser step; the summed gradient is the same). Backward passes are counted
  over the batch, its augmented copy and the replayed source batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from testtime.adapt.components.augment import TTAAugment
from testtime.adapt.components.consistency import (
    class_prototypes,
    multiview_contrastive_loss,
    nearest_prototype,
    projection_head,
)
from testtime.adapt.components.features import FeatureTap, find_classifier
from testtime.adapt.components.losses import symmetric_cross_entropy
from testtime.adapt.components.norm_types import ALL_WEIGHTS
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.teacher import ema_update, frozen_copy
from testtime.adapt.config import OptimConfig
from testtime.adapt.registry import register_method


@dataclass
class RMTConfig(OptimConfig):
    optimizer: str = "adam"
    lr: float = 1e-3
    ema_momentum: float = 0.999
    lambda_ce_trg: float = 1.0
    lambda_cont: float = 1.0
    lambda_ce_src: float = 1.0
    warmup_samples: int = 50000
    source_batch_size: int = 200
    temperature: float = 0.1
    projection_dim: int = 128
    max_prototype_samples: int = 100000

    def checks(self) -> list[tuple[str, bool, str]]:
        finite_nonneg = [
            (k, math.isfinite(getattr(self, k)) and getattr(self, k) >= 0, "must be >= 0")
            for k in ("lambda_ce_trg", "lambda_cont", "lambda_ce_src")
        ]
        return [
            *super().checks(),
            *finite_nonneg,
            ("ema_momentum", 0 <= self.ema_momentum <= 1, "must be in [0, 1]"),
            ("warmup_samples", self.warmup_samples >= 0, "must be >= 0"),
            ("source_batch_size", self.source_batch_size >= 1, "must be >= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature > 0, "must be > 0"),
            ("projection_dim", self.projection_dim >= 1, "must be >= 1"),
            ("max_prototype_samples", self.max_prototype_samples >= 1, "must be >= 1"),
        ]


@register_method
class RMT(GradientMethod):
    """Mean teacher with symmetric cross-entropy and source-prototype contrastive alignment."""

    name = "rmt"
    Config = RMTConfig
    paper = "Döbler et al., CVPR 2023"
    trainable = "all"
    config: RMTConfig

    def setup(self) -> None:
        _, fc = find_classifier(self.model)
        super().setup()
        cfg = self.config
        self.teacher = frozen_copy(self.model)  # before the feature hook is attached
        self.tap = FeatureTap(self.model)
        self.augment = TTAAugment()
        self.register_buffer("prototypes", self._prototypes(fc.weight.detach().clone()))
        self.projector = projection_head(self.prototypes.shape[1], cfg.projection_dim, self.rng)
        assert self.optimizer is not None
        self.optimizer.add_param_group({"params": list(self.projector.parameters())})
        if self.source_data is not None and cfg.warmup_samples // cfg.source_batch_size > 0:
            self._warmup(cfg.warmup_samples // cfg.source_batch_size)

    def counted_networks(self) -> list[nn.Module]:
        return [self.model, self.teacher]

    # ------------------------------------------------------------------ source data
    def _source_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.source_data is not None
        xs, ys = self.source_data
        idx = torch.randint(len(xs), (n,), generator=self.rng)
        return xs[idx], ys[idx]

    @torch.no_grad()
    def _prototypes(self, fallback: torch.Tensor) -> torch.Tensor:
        """Mean source feature per class (source data given), else the classifier weights."""
        if self.source_data is None:
            return fallback
        xs, ys = self.source_data
        n = min(len(xs), self.config.max_prototype_samples)
        bs = self.config.source_batch_size
        tap = FeatureTap(self.model)
        try:
            feats = torch.cat([tap(self.model, xs[i : min(n, i + bs)])[0] for i in range(0, n, bs)])
        finally:
            tap.remove()
        return class_prototypes(feats, ys[:n], fallback)

    def _warmup(self, steps: int) -> None:
        """Warm up student and teacher on source batches with a linear learning-rate ramp."""
        assert self.optimizer is not None
        final = [g["lr"] for g in self.optimizer.param_groups]
        for i in range(steps):
            for g, lr in zip(self.optimizer.param_groups, final):
                g["lr"] = lr * (i + 1) / steps
            xs, _ = self._source_batch(self.config.source_batch_size)
            with torch.no_grad():
                target = self.teacher(xs)
            loss = symmetric_cross_entropy(self.model(xs), target).mean()
            self.backward_and_step(loss, len(xs))
            ema_update(self.teacher, self.model, self.config.ema_momentum)
        for g, lr in zip(self.optimizer.param_groups, final):
            g["lr"] = lr
        self.n_backward.zero_()  # source preparation, not test-time work (its forwards are not counted either)

    # ------------------------------------------------------------------ adaptation
    def step(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        for _ in range(cfg.steps):
            feats, logits = self.tap(self.model, x)
            feats_aug, logits_aug = self.tap(self.model, self.augment(x, self.rng))
            with torch.no_grad():
                teacher = self.teacher(x)
                protos = self.prototypes[nearest_prototype(feats, self.prototypes)]
            views = torch.stack([protos, feats, feats_aug], 1)  # (N, 3, D)
            loss_cont = multiview_contrastive_loss(self.projector(views), cfg.temperature)
            loss_st = 0.5 * (
                symmetric_cross_entropy(logits, teacher) + symmetric_cross_entropy(logits_aug, teacher)
            )
            loss = cfg.lambda_ce_trg * loss_st.mean() + cfg.lambda_cont * loss_cont
            n_back = 2 * x.shape[0]  # the batch and its augmented copy
            if self.source_data is not None and cfg.lambda_ce_src > 0:
                xs, ys = self._source_batch(x.shape[0])
                loss = loss + cfg.lambda_ce_src * F.cross_entropy(self.model(xs), ys)
                n_back += len(xs)
            self.backward_and_step(loss, n_back)
            ema_update(self.teacher, self.model, cfg.ema_momentum)
        return logits + teacher

    def minimal_passes(self) -> Passes:
        s, cfg = self.config.steps, self.config
        src = self.source_data is not None and cfg.lambda_ce_src > 0
        return Passes(
            (3 + src) * s,
            (2 + src) * s,
            "per step student forwards of the batch and of its augmented copy (both trained), one "
            "no-grad teacher forward"
            + ("; plus a trained forward of an equally large source batch" if src else ""),
        )

    norm_support = ALL_WEIGHTS
