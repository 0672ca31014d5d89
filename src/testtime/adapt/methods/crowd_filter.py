"""Crowd filter: Tent with the "wisdom of crowds" sample selection.

Lee, Das, Choo, Choi. "Towards Open-Set Test-Time Adaptation Utilizing the Wisdom of Crowds in
Entropy Minimization." ICCV 2023.

Tent (BatchNorm with test-batch statistics, BN affine parameters trained on the batch entropy)
where the entropy is averaged only over samples whose confidence did not drop: with y0 the class
predicted by the source model, a sample is kept when the adapted model's p(y0 | x) is at least the
source model's p(y0 | x). The source model is a frozen copy of the wrapped model taken at setup
(same batch-statistics normalisation, source affine parameters); its forward pass runs without
gradients. Nothing is backpropagated when no sample is kept. The filter itself is the component
`components/selection.py::CrowdFilter` and plugs into `eta`, `eata` and `sar` with
`crowd_filter=True`.

| option | default | source |
| --- | --- | --- |
| optimizer, lr | adam, 1e-3 | Tent's CIFAR setting (the paper applies the filter to Tent's recipe) |
| steps | 1 | paper (online) |
| comparison | keep if p_adapted(y0) >= p_source(y0) | paper; as the public reimplementation in UniEnt (`ostta.py`) |

Deviations:
- No official code was found; the public reimplementation in the UniEnt repository
  (gaozhengqing/UniEnt, `cifar/ostta.py`) was read instead. It adds a batch-diversity term
  (mean-prediction entropy, weight alpha) to the loss for all its baselines; that term is not
  part of the crowd filter and is not used here.
- Backward passes are counted over the whole batch (the loss covers kept samples, its graph the
  full batch forward).
"""

from __future__ import annotations

import torch

from testtime.adapt.components.losses import entropy
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.selection import CrowdFilterMixin
from testtime.adapt.methods.tent import Tent, TentConfig
from testtime.adapt.registry import register_method


@register_method
class CrowdFilterTent(CrowdFilterMixin, Tent):
    """Tent whose entropy loss skips samples that became less confident than under the source."""

    name = "crowd_filter"
    Config = TentConfig
    paper = "Lee et al., ICCV 2023"
    config: TentConfig

    def setup(self) -> None:
        super().setup()
        self.setup_crowd(True)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.episodic:
            self.reset()
        source_probs = self.crowd_source_probs(x)
        for _ in range(self.config.steps):
            logits = self.model(x)
            keep = self.crowd_keep(source_probs, logits)
            if keep.any():
                self.backward_and_step(entropy(logits)[keep].mean(), x.shape[0])
        return logits

    def minimal_passes(self) -> Passes:
        s = self.config.steps
        return Passes(
            1 + s, s, "Tent's forward and backward per step, plus one forward of the frozen source copy"
        )
