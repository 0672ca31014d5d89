"""DeYO: destroy your object — entropy and PLPD sample selection and weighting.

Lee, Jung, Lee, Park, Shin, Hwang, Yoon. "Entropy is not Enough for Test-Time Adaptation: From
the Perspective of Disentangled Factors." ICLR 2024.

Norm layers' affine parameters train (BatchNorm with test-batch statistics). Each batch is
predicted by one forward pass; samples with entropy below tau_Ent = 0.5 ln C are kept, their
images are destroyed by shuffling a 4 x 4 grid of patches, and a no-grad forward of the
destroyed images gives the pseudo-label probability difference PLPD = p(y|x) - p(y|x') for the
predicted class y. Samples with PLPD > tau_PLPD are used; each entropy term is weighted by
1 / exp(E - E0) + exp(PLPD) with E0 = 0.4 ln C.

| option | default | source |
| --- | --- | --- |
| optimizer | sgd, momentum 0.9 | official code |
| lr | 0.005 | no CIFAR setting in the paper/code (ImageNet: 0.00025 at batch 64); EATA's CIFAR-10 lr, the SGD recipe DeYO inherits |
| e_margin (tau_Ent / ln C) | 0.5 | paper, official code (`deyo_margin`) |
| weight_margin (E0 / ln C) | 0.4 | paper, official code (`deyo_margin_e0`) |
| plpd_threshold (tau_PLPD) | 0.3 | official script, i.i.d. ("mild") setting with BN ResNet-50 (0.2 in the wild settings / argparse default) |
| aug_type | patch | official code (`patch`; `pixel` also offered) |
| patch_len | 4 (4 x 4 patches) | official code |
| filter_ent, filter_plpd | True, True | official code |
| reweight_ent, reweight_plpd | True, True | official code |
| skip_top_layers | True | official code (`collect_params`, as SAR; nothing excluded on ResNet-26) |

Deviations:
- The occlusion augmentation (`occ`, a fixed 112 px window at (56, 56) for ImageNet) is not
  offered; `patch` is the official default.
- Patches are shuffled with the method's seeded generator (one permutation per image, as the
  official code) and images whose side is not a multiple of `patch_len` are resized with bilinear
  interpolation (the official code uses torchvision's Resize); 32 x 32 images with 4 patches per
  side are not resized.
- Backward passes are counted over the whole batch (the loss covers selected samples, its graph
  the full batch forward). As in the official code, nothing is backpropagated when no sample
  passes the filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from testtime.adapt.components.losses import entropy
from testtime.adapt.components.norm_types import NORM_AFFINE
from testtime.adapt.components.optim import build_optimizer
from testtime.adapt.components.passes import Passes, per_image
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.selection import (
    SelectionConfig,
    entropy_margin,
    entropy_weights,
    patch_shuffle,
    plpd,
    prepare_norm_adaptation,
    register_selection_counters,
)
from testtime.adapt.registry import register_method


@dataclass
class DeYOConfig(SelectionConfig):
    e_margin: float = 0.5
    weight_margin: float = 0.4
    plpd_threshold: float = 0.3
    aug_type: str = "patch"
    patch_len: int = 4
    filter_ent: bool = True
    filter_plpd: bool = True
    reweight_ent: bool = True
    reweight_plpd: bool = True
    skip_top_layers: bool = True

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("weight_margin", math.isfinite(self.weight_margin), "must be a finite number"),
            ("plpd_threshold", -1 <= self.plpd_threshold <= 1, "must be in [-1, 1]"),
            ("aug_type", self.aug_type in ("patch", "pixel"), "must be 'patch' or 'pixel'"),
            ("patch_len", self.patch_len >= 1, "must be >= 1"),
        ]


@register_method
class DeYO(GradientMethod):
    """Entropy minimisation on samples selected and weighted by entropy and PLPD."""

    name = "deyo"
    Config = DeYOConfig
    paper = "Lee et al., ICLR 2024"
    config: DeYOConfig

    def setup(self) -> None:
        self.params = prepare_norm_adaptation(self.model, self.config.skip_top_layers)
        self.optimizer = build_optimizer(self.params, self.config)
        register_selection_counters(self)  # passed the entropy filter / also the PLPD filter

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        """The object-destructive transformation (patch or pixel shuffling)."""
        if self.config.aug_type == "patch":
            return patch_shuffle(x, self.config.patch_len, self.rng)
        n, c, h, w = x.shape
        order = torch.randperm(h * w, generator=self.rng).to(x.device)  # one permutation per batch
        return x.reshape(n, c, h * w)[:, :, order].reshape(n, c, h, w)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        for _ in range(c.steps):
            logits = self.model(x)
            ent = entropy(logits)
            keep = ent.detach() < entropy_margin(logits.shape[1], c.e_margin) if c.filter_ent else ent > -1
            if not keep.any():
                continue
            with torch.no_grad():
                destroyed = self.model(self.destroy(x[keep])).softmax(1)
            d = plpd(logits.detach()[keep].softmax(1), destroyed)
            sel = d > c.plpd_threshold if c.filter_plpd else d >= -2
            self.n_reliable += int(keep.sum())
            self.n_selected += int(sel.sum())
            if not sel.any():
                continue
            e, d = ent[keep][sel], d[sel]
            loss = e
            if c.reweight_ent or c.reweight_plpd:
                w0 = entropy_margin(logits.shape[1], c.weight_margin)
                coeff = c.reweight_ent * entropy_weights(e, w0) + c.reweight_plpd * torch.exp(d)
                loss = e * coeff
            self.backward_and_step(loss.mean(), x.shape[0])
        return logits

    def minimal_passes(self) -> Passes:
        s = self.config.steps
        return Passes(
            s + per_image(self.n_images, int(self.n_reliable)),
            s,
            "per step one forward (entropy, PLPD reference, prediction) and one backward; plus a "
            "no-grad forward of the shuffled copies of the entropy-reliable samples only",
        )

    norm_support = replace(
        NORM_AFFINE,
        note="top layers skipped",
        source="official code: `collect_params` as SAR (BN, GN and LN affine parameters)",
    )
