"""SAR: sharpness-aware and reliable entropy minimisation, with model recovery.

Niu, Wu, Zhang, Wen, Chen, Zhao, Tan. "Towards Stable Test-Time Adaptation in Dynamic Wild
World." ICLR 2023.

Norm layers' affine parameters train (BatchNorm with test-batch statistics; SAR targets GroupNorm
and LayerNorm models but the paper also reports BN models). Each batch: the entropy of samples
below E0 = 0.4 ln C is minimised with SAM (radius rho) around SGD; at the perturbed weights the
samples are filtered again by E0 and the second loss gives the update. An exponential moving
average (0.9) of that second loss is tracked; when it falls below `reset_constant` (0.2) the
model and optimiser are restored to the source (model recovery). Predictions are those of the
first forward pass.

Layers: the official code does not adapt the top of deep models (any module named `layer4`, i.e.
the last ResNet-50 stage, the last three ViT-Base blocks `blocks.9-11` and the final `norm`);
`skip_top_layers=True` applies the same name rules. On the CIFAR ResNet-26 (stages
`layer1`-`layer3`) nothing is excluded.

| option | default | source |
| --- | --- | --- |
| optimizer | sgd, momentum 0.9 (base of SAM) | paper, official code |
| lr | 0.005 | no CIFAR setting in the paper/code (ImageNet: 0.00025 at batch 64); EATA's CIFAR-10 lr, same authors and SGD recipe |
| rho | 0.05 | paper, official code (SAM default) |
| adaptive | False | official code |
| e_margin (E0 / ln C) | 0.4 | paper, official code |
| reset_constant (e_0) | 0.2 | paper, official code |
| ema_momentum | 0.9 | official code (`update_ema`) |
| skip_top_layers | True | official code (`collect_params`) |
| crowd_filter | False | optional: the crowd filter (Lee et al. 2023) also gates the first selection |

Deviations:
- Efficiency: when no sample passes the first filter the official code still runs the second
  forward and backpropagates an empty mean (all-zero gradients), which amounts to an optimiser
  step with zero gradients (SGD momentum still moves); here that zero-gradient step is taken
  directly, without the two wasted passes. The same applies when the second filter selects
  nothing (the second backward is skipped, the zero-gradient step taken). Results are identical.
- Backward passes are counted over the whole batch (each loss covers selected samples, its graph
  the full batch forward).
- As in the official code, the loss average survives a recovery (its `reset()` clears it, but the
  caller then stores the updated value again), so recovery can repeat on following batches while
  the average stays below the constant.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from testtime.adapt.components.losses import entropy
from testtime.adapt.components.norm_types import NORM_AFFINE
from testtime.adapt.components.optim import build_optimizer
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.sam import SharpnessAware, sam_update, zero_grad_step
from testtime.adapt.components.selection import (
    CrowdFilterMixin,
    SelectionConfig,
    entropy_margin,
    prepare_norm_adaptation,
)
from testtime.adapt.registry import register_method


@dataclass
class SARConfig(SelectionConfig):
    rho: float = 0.05
    adaptive: bool = False
    reset_constant: float = 0.2
    ema_momentum: float = 0.9
    skip_top_layers: bool = True
    crowd_filter: bool = False

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("rho", math.isfinite(self.rho) and self.rho >= 0, "must be a finite number >= 0"),
            (
                "reset_constant",
                math.isfinite(self.reset_constant) and self.reset_constant >= 0,
                "must be >= 0",
            ),
            ("ema_momentum", 0 <= self.ema_momentum < 1, "must be in [0, 1)"),
        ]


@register_method
class SAR(CrowdFilterMixin, GradientMethod):
    """Reliable entropy minimisation with SAM on norm affine parameters, plus model recovery."""

    name = "sar"
    Config = SARConfig
    paper = "Niu et al., ICLR 2023"
    config: SARConfig

    def setup(self) -> None:
        c = self.config
        self.params = prepare_norm_adaptation(self.model, c.skip_top_layers)
        self.optimizer = build_optimizer(self.params, c)
        self.sam = SharpnessAware(self.params, c.rho, c.adaptive)
        self.register_buffer("loss_ema", torch.tensor(float("nan")))  # NaN: no value yet
        self.register_buffer("n_recoveries", torch.zeros((), dtype=torch.long))
        self.setup_crowd(c.crowd_filter)

    def margin(self, logits: torch.Tensor) -> float:
        return entropy_margin(logits.shape[1], self.config.e_margin)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        source_probs = self.crowd_source_probs(x)
        for _ in range(self.config.steps):
            logits = self.model(x)
            margin = self.margin(logits)
            ent = entropy(logits)
            reliable = (ent.detach() < margin) & self.crowd_keep(source_probs, logits)
            if not reliable.any():
                zero_grad_step(self)
                self.recover_if_collapsed()
                continue
            second: list[float] = []
            closure = functools.partial(self.second_loss, x, reliable, margin, second)
            sam_update(self, self.sam, ent[reliable].mean(), x.shape[0], closure)
            if second and math.isfinite(second[0]):
                self.update_ema(second[0])
            self.recover_if_collapsed()
        return logits

    def minimal_passes(self) -> Passes:
        s, crowd = self.config.steps, self.crowd is not None
        return Passes(
            2 * s + crowd,
            2 * s,
            "SAM per step: forward and backward at w (entropy, selection, prediction), then at the "
            "perturbed w + e(w); both on the whole batch, whose statistics the BN layers use"
            + ("; plus one forward of the frozen source copy" if crowd else ""),
        )

    def second_loss(
        self, x: torch.Tensor, reliable: torch.Tensor, margin: float, record: list[float]
    ) -> tuple[torch.Tensor | None, int]:
        """Entropy at the perturbed weights of the reliable samples that are still reliable."""
        ent = entropy(self.model(x))[reliable]
        keep = ent.detach() < margin
        if not keep.any():
            return None, 0
        loss = ent[keep].mean()
        record.append(float(loss.detach()))
        return loss, x.shape[0]

    def update_ema(self, value: float) -> None:
        m = self.config.ema_momentum
        old = float(self.loss_ema)
        self.loss_ema.fill_(value if math.isnan(old) else m * old + (1 - m) * value)

    def recover_if_collapsed(self) -> None:
        """Restore the source model and optimiser when the loss average is below the constant."""
        ema = float(self.loss_ema)
        if math.isnan(ema) or ema >= self.config.reset_constant:
            return
        recoveries = int(self.n_recoveries)
        self.reset()
        self.loss_ema.fill_(ema)
        self.n_recoveries.fill_(recoveries + 1)

    norm_support = replace(
        NORM_AFFINE,
        note="top layers skipped",
        source="paper / official code: GN and LN affine parameters in its ResNet-50-GN and ViT-B/16 experiments",
    )
