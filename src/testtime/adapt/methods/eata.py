"""ETA and EATA: efficient, anti-forgetting test-time adaptation.

Niu, Wu, Zhang, Chen, Zheng, Zhao, Tan. "Efficient Test-Time Model Adaptation without
Forgetting." ICML 2022.

BatchNorm layers normalise with test-batch statistics and only their affine parameters train.
Each batch is predicted by one forward pass; the entropy loss is applied only to *reliable*
samples (entropy below E0 = 0.4 ln C) that are also *non-redundant* (|cos| between the sample's
softmax output and a moving average of earlier selected outputs below epsilon), each weighted by
1 / exp(E - E0). The moving average (momentum alpha = 0.9) is updated with the selected
outputs. No backward pass is run when nothing is selected. EATA adds the Fisher-weighted
anti-forgetting penalty beta * sum_i F_i (theta_i - theta_i^0)^2.

Fisher information (EATA): the official code estimates it on `fisher_size` = 2000 clean
(in-distribution) samples with the model's pseudo-labels. Here it is computed at construction
from `source_data` when given (the first `fisher_size` samples, default 2000). Without source
data it is estimated on the test stream itself, *before any update*: from the first test batch
(default), or from the first batches until `fisher_size` test samples have been seen, during which
the model only predicts (no adaptation). The Fisher pass reuses each batch's forward (one extra
backward). A test-derived Fisher is part of the adapted state: `reset()` forgets it and it is
estimated again from the next batch(es).

| option | default | source |
| --- | --- | --- |
| optimizer | sgd, momentum 0.9 | paper / official code |
| lr | 0.005 | paper, CIFAR-10 (0.00025 for ImageNet), batch size 64 |
| e_margin (E0 / ln C) | 0.4 | paper, official code (`0.4 * ln 1000`) |
| d_margin (epsilon) | 0.4 | paper, CIFAR-10 (0.05 for ImageNet in the official code) |
| prob_momentum (alpha) | 0.9 | official code (`update_model_probs`) |
| fisher_alpha (beta, EATA) | 1.0 | paper, CIFAR-10 (2000 for ImageNet in the official code) |
| fisher_size (EATA) | None: 2000 source samples, else the first test batch | official code (2000) / see above |
| fisher_batch_size (EATA) | 64 | official code (its loader's batch size) |
| crowd_filter | False | optional: also drop samples failing the crowd filter (Lee et al. 2023) |

Deviations:
- Without clean samples the Fisher comes from test batches (see above); the official code always
  uses clean held-out samples.
- Backward passes are counted over the whole batch: the loss covers only the selected samples but
  its graph is the full batch forward (as in the official "version 1"); the official code, like
  this one, skips the backward and the step when no sample is selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from testtime.adapt.components.features import find_classifier
from testtime.adapt.components.fisher import QuadraticAnchor, fisher_diagonal, pseudo_label_loss
from testtime.adapt.components.losses import entropy
from testtime.adapt.components.norm_types import NORM_AFFINE
from testtime.adapt.components.passes import Passes, new_tally, per_image
from testtime.adapt.components.recipe import GradientMethod
from testtime.adapt.components.selection import (
    CrowdFilterMixin,
    RedundancyFilter,
    SelectionConfig,
    entropy_margin,
    entropy_weights,
    register_selection_counters,
)
from testtime.adapt.registry import register_method


@dataclass
class ETAConfig(SelectionConfig):
    d_margin: float = 0.4
    prob_momentum: float = 0.9
    crowd_filter: bool = False

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("d_margin", math.isfinite(self.d_margin) and self.d_margin > 0, "must be a positive number"),
            ("prob_momentum", 0 <= self.prob_momentum < 1, "must be in [0, 1)"),
        ]


@dataclass
class EATAConfig(ETAConfig):
    fisher_alpha: float = 1.0
    fisher_size: int | None = None
    fisher_batch_size: int = 64

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("fisher_alpha", math.isfinite(self.fisher_alpha) and self.fisher_alpha >= 0, "must be >= 0"),
            ("fisher_size", self.fisher_size is None or self.fisher_size >= 1, "must be None or >= 1"),
            ("fisher_batch_size", self.fisher_batch_size >= 1, "must be >= 1"),
        ]


@register_method
class ETA(CrowdFilterMixin, GradientMethod):
    """Entropy minimisation on reliable, non-redundant samples, re-weighted by their entropy."""

    name = "eta"
    Config = ETAConfig
    paper = "Niu et al., ICML 2022"
    config: ETAConfig

    def setup(self) -> None:
        super().setup()
        num_classes = find_classifier(self.model)[1].out_features
        self.margin = entropy_margin(num_classes, self.config.e_margin)
        self.redundancy = RedundancyFilter(num_classes, self.config.d_margin, self.config.prob_momentum)
        register_selection_counters(self)  # passed the entropy filter / also the redundancy filter
        self.setup_crowd(self.config.crowd_filter)

    def penalty(self) -> torch.Tensor | float:
        """Extra loss term added to every update (EATA's anti-forgetting regulariser)."""
        return 0.0

    def ready(self, logits: torch.Tensor) -> bool:
        """Whether to adapt on this batch (EATA first estimates its Fisher)."""
        return True

    def step(self, x: torch.Tensor) -> torch.Tensor:
        source_probs = self.crowd_source_probs(x)
        for _ in range(self.config.steps):
            logits = self.model(x)
            if not self.ready(logits):
                continue
            ent = entropy(logits)
            reliable = (ent.detach() < self.margin) & self.crowd_keep(source_probs, logits)
            probs = logits.detach().softmax(1)
            selected = reliable & self.redundancy.mask(probs)
            self.redundancy.update(probs[selected])
            self.n_reliable += int(reliable.sum())
            self.n_selected += int(selected.sum())
            if selected.any():
                e = ent[selected]
                loss = (e * entropy_weights(e, self.margin)).mean() + self.penalty()
                self.backward_and_step(loss, x.shape[0])
        return logits

    def minimal_passes(self) -> Passes:
        s, crowd = self.config.steps, self.crowd is not None
        return Passes(
            s + crowd,
            s,
            "per step one forward gives the entropies, the selection and the prediction; one backward "
            "when a sample is selected" + ("; plus one forward of the frozen source copy" if crowd else ""),
        )


@register_method
class EATA(ETA):
    """ETA plus a Fisher-weighted penalty that anchors the adapted parameters to the source."""

    name = "eata"
    Config = EATAConfig
    paper = "Niu et al., ICML 2022"
    config: EATAConfig

    def setup(self) -> None:
        super().setup()
        c = self.config
        self.named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.anchor = QuadraticAnchor(self.named, {n: torch.zeros_like(p) for n, p in self.named.items()})
        self.register_buffer("fisher_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("fisher_needed", torch.zeros((), dtype=torch.long))  # test samples still to use
        self.tally = new_tally()  # "fisher": test images whose batch gave a Fisher estimate
        if c.fisher_alpha == 0:
            return
        if self.source_data is not None:
            x = self.source_data[0][: c.fisher_size or 2000]
            batches = [x[i : i + c.fisher_batch_size] for i in range(0, len(x), c.fisher_batch_size)]
            self.anchor.set_fisher(fisher_diagonal(self.model, self.named, batches))
            self.fisher_batches.fill_(len(batches))
        else:
            self.fisher_needed.fill_(c.fisher_size or 1)

    def fisher(self) -> dict[str, torch.Tensor]:
        """The current diagonal Fisher estimate, by parameter name."""
        return {n: getattr(self.anchor, f"fisher_{i}") for i, n in enumerate(self.anchor.names)}

    def ready(self, logits: torch.Tensor) -> bool:
        if int(self.fisher_needed) <= 0:
            return True
        # Fisher from this test batch, at the source parameters (nothing has been updated yet)
        grads = torch.autograd.grad(pseudo_label_loss(logits), list(self.named.values()), retain_graph=True)
        b = int(self.fisher_batches)
        fisher = self.fisher()
        self.anchor.set_fisher(
            {n: (fisher[n] * b + g.detach() ** 2) / (b + 1) for n, g in zip(self.named, grads)}
        )
        self.fisher_batches += 1
        self.n_backward += logits.shape[0]
        self.tally["fisher"] += logits.shape[0]
        self.fisher_needed.sub_(logits.shape[0]).clamp_(min=0)
        return int(self.fisher_needed) == 0

    def minimal_passes(self) -> Passes:
        eta = super().minimal_passes()
        fisher = per_image(self.n_images, self.tally["fisher"])
        why = "; the Fisher backward of the first test batch(es) (no source data), sharing their forward"
        return Passes(eta.forward, eta.backward + fisher, eta.why + (why if fisher else ""))

    def penalty(self) -> torch.Tensor | float:
        if self.config.fisher_alpha == 0:
            return 0.0
        return self.config.fisher_alpha * self.anchor(self.named)

    norm_support = NORM_AFFINE
