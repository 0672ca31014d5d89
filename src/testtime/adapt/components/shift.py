"""Shift detection from normalisation statistics: which statistics should normalise the next batch.

Test-batch statistics (BN-adapt) follow a change of domain at once but fail when a batch holds
few classes (label-correlated streams): the batch's statistics then describe its classes as much
as its domain. Running (exponentially averaged) test statistics resist that (RoTTA's robust BN,
DELTA's test-time batch renormalisation) but lag every change of domain. `ShiftDetector` chooses
between them batch by batch from the statistics the BatchNorm layers already compute:

- the **first third** of the layers (module order) see low-level image content (noise, blur,
  contrast, colour), which depends on the domain and little on the classes: a large divergence
  there between the batch and the running statistics is a **change of domain**;
- the **last third** see class-specific features: a large divergence there alone is a batch of
  unusual class composition, i.e. **label shift**.

The divergence of a layer is the symmetric Kullback-Leibler divergence between the per-channel
Gaussians of the batch and of the running statistics, averaged over channels, then over the
layers of a group. After each batch the detector decides for the next one: a change of domain
(shallow score above `threshold`) restarts every layer's running statistics from the batch that
showed it and normalises with batch statistics; otherwise a deep score above `label_threshold / n`
(n: the batch size; sampling noise alone makes a batch diverge by about 1/n, so the evidence asked
for grows as batches shrink) normalises with the running statistics (slow), and anything else
with the batch's. While the stream is label-shifted (slow), a change of domain restarts nothing:
a restart would start from one batch of few classes, and in validation that bias cost more than
the running average's lag. The running statistics are updated with every batch at the layer's
slow momentum. A detection costs a few reductions over channels per layer.

The running statistics start from the source's; the first batch restarts them only if it is far
enough from them. Decisions come one batch late (the batch that shows a shift is still normalised
the old way): the deep layers' evidence exists only at the end of the forward pass.

Our own design, not a published method; the thresholds and the slow momentum were chosen on the
validation corruptions only (`benchmarks/default_recipe/`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from testtime.errors import ModelError


class ShiftDetector(nn.Module):
    """Shared by the BatchNorm layers of one model; its state is buffers (saved and reset with it).

    `batch` counts forward passes (advanced by the first layer), `reset_to` is the batch that last
    showed a change of domain (0: none), `slow` whether the next batch normalises with the running
    statistics; `shifts` / `label_batches` count domain changes and label-shifted batches, and
    `last_scores` keeps the latest (shallow, deep) scores for diagnostics.
    """

    def __init__(
        self, threshold: float, label_threshold: float, n_layers: int, fraction: float = 1 / 3
    ) -> None:
        super().__init__()
        for name, value in (("shift_threshold", threshold), ("label_threshold", label_threshold)):
            if not (math.isfinite(value) and value >= 0):
                raise ModelError(f"{name} must be a finite number >= 0 (0: off), got {value}")
        if n_layers < 1:
            raise ModelError(f"the shift detector needs at least one layer, got {n_layers}")
        self.threshold = float(threshold)
        self.label_threshold = float(label_threshold)
        self.n_layers = int(n_layers)
        self.n_group = max(1, math.ceil(fraction * n_layers))
        self.n = 0  # samples in the current batch
        self.register_buffer("batch", torch.zeros((), dtype=torch.long))
        self.register_buffer("reset_to", torch.zeros((), dtype=torch.long))
        self.register_buffer("slow", torch.tensor(False))
        self.register_buffer("shifts", torch.zeros((), dtype=torch.long))
        self.register_buffer("label_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("reports", torch.zeros((), dtype=torch.long))
        self.register_buffer("scores", torch.zeros(2))
        self.register_buffer("last_scores", torch.full((2,), float("nan")))

    def extra_repr(self) -> str:
        return (
            f"shift_threshold={self.threshold:g}, label_threshold={self.label_threshold:g}, "
            f"layers={self.n_layers}, group={self.n_group}"
        )

    def begin_batch(self, n: int) -> None:
        self.batch += 1
        self.n = int(n)
        self.reports.zero_()
        self.scores.zero_()

    def restart_due(self, done: int) -> bool:
        """Whether a layer that last restarted at batch `done` must restart now."""
        reset_to = int(self.reset_to)
        return done < reset_to < int(self.batch)

    @torch.no_grad()
    def report(
        self,
        index: int,
        mean_b: torch.Tensor,
        var_b: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
    ) -> None:
        """Layer `index` (module order) reports its batch moments against its running statistics;
        after the last layer the next batch's normalisation is decided."""
        shallow, deep = index < self.n_group, index >= self.n_layers - self.n_group
        if shallow or deep:  # one divergence per layer, also when a short model's groups overlap
            kl = symmetric_kl(mean_b, var_b, mean, var, eps) / self.n_group
            self.scores[0] += kl if shallow else 0.0
            self.scores[1] += kl if deep else 0.0
        self.reports += 1
        if int(self.reports) == self.n_layers:
            self.last_scores.copy_(self.scores)
            shallow, deep = float(self.scores[0]), float(self.scores[1])
            if self.threshold > 0 and shallow > self.threshold and not bool(self.slow):
                self.reset_to.copy_(self.batch)
                self.shifts += 1
            else:
                # sampling noise alone makes a batch of n samples diverge by about 1/n: the threshold is
                # per sample (label_threshold / n), so small batches need stronger evidence
                self.slow.fill_(self.label_threshold > 0 and deep > self.label_threshold / max(1, self.n))
                self.label_batches += int(bool(self.slow))


def symmetric_kl(
    m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor, eps: float
) -> torch.Tensor:
    """Mean over channels of the symmetric KL divergence (half the sum of both directions) between
    the Gaussians N(m1, v1) and N(m2, v2) of each channel."""
    v1, v2 = v1.float() + eps, v2.float() + eps
    d2 = (m1.float() - m2.float()) ** 2
    return (0.25 * (v1 / v2 + v2 / v1 - 2) + 0.25 * d2 * (1 / v1 + 1 / v2)).mean()


def attach_shift_detector(model: nn.Module, threshold: float, label_threshold: float) -> ShiftDetector | None:
    """Give every norm layer of `model` that keeps running test statistics (`attach_detector`) one
    shared detector. None if there are no such layers (e.g. a GroupNorm/LayerNorm model)."""
    layers = [m for m in model.modules() if hasattr(m, "attach_detector")]
    if not layers:
        return None
    detector = ShiftDetector(threshold, label_threshold, len(layers))
    for i, layer in enumerate(layers):
        layer.attach_detector(detector, i)
    return detector
