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
showed it and normalises with batch statistics; otherwise a deep score above the label threshold
normalises with the running statistics (slow), and anything else with the batch's. The threshold is
measured against the batch's own sampling noise, one of two ways (`label_noise`):

- ``"per_sample"``: deep score > `label_threshold / n` (n: the batch size; sampling noise alone
  makes a batch of n samples diverge by about c/n). The constant c depends on the network: about
  0.2 for the BatchNorm2d layers of our CIFAR ResNet-26 (many values per channel, per image), about
  1.3 for the BatchNorm1d layer of the digit network (one value per channel and image, heavy-tailed),
  so a threshold chosen on one network flags about half of the other's i.i.d. batches;
- ``"split_half"``: deep score > `label_threshold * h`, h the same divergence between the batch's
  two halves (even and odd samples), per deep layer. h measures the batch's sampling noise in the
  units of the network at hand (for i.i.d. batches the ratio deep / h is about 0.3 on both networks
  above), and a batch of few classes is as homogeneous within as an i.i.d. one: only its
  divergence from the running average grows. Costs one more moment pass over the deep third's
  inputs. A batch of fewer than 4 samples is never judged label-shifted this way.

The statistics alone also call some i.i.d. batches label-shifted (a domain shift that moves the
deep layers more than the first ones reads the same way until the running average catches up). A
method that has the batch's predictions can withdraw the verdict (`check_predictions`): a batch of
few classes has its predictions concentrated on few classes, an i.i.d. batch spread over all.

While the stream is label-shifted (slow), a change of domain restarts nothing: a restart would
start from one batch of few classes, and in validation that bias cost more than
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

from testtime.adapt.components.norm import AdaptiveNorm, fast_moments
from testtime.errors import ModelError

LABEL_NOISE = ("per_sample", "split_half")  # how the label test measures a batch's sampling noise


class ShiftDetector(nn.Module):
    """Shared by the BatchNorm layers of one model; its state is buffers (saved and reset with it).

    `batch` counts forward passes (advanced by the first layer), `reset_to` is the batch that last
    showed a change of domain (0: none), `slow` whether the next batch normalises with the running
    statistics; `shifts` / `label_batches` count domain changes and label-shifted batches, and
    `last_scores` keeps the latest (shallow, deep, split-half) scores for diagnostics (the third is
    NaN unless `label_noise` is "split_half").
    """

    def __init__(
        self,
        threshold: float,
        label_threshold: float,
        n_layers: int,
        fraction: float = 1 / 3,
        label_noise: str = "per_sample",
    ) -> None:
        super().__init__()
        for name, value in (("shift_threshold", threshold), ("label_threshold", label_threshold)):
            if not (math.isfinite(value) and value >= 0):
                raise ModelError(f"{name} must be a finite number >= 0 (0: off), got {value}")
        if label_noise not in LABEL_NOISE:
            raise ModelError(f"label_noise must be one of {', '.join(LABEL_NOISE)}, got {label_noise!r}")
        self.label_noise = label_noise
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
        self.register_buffer("scores", torch.zeros(3))
        self.register_buffer("last_scores", torch.full((3,), float("nan")))

    def extra_repr(self) -> str:
        return (
            f"shift_threshold={self.threshold:g}, label_threshold={self.label_threshold:g}, "
            f"layers={self.n_layers}, group={self.n_group}, label_noise={self.label_noise}"
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

    def _splits(self) -> bool:
        """Whether this batch's label test uses the split-half noise (mode, and at least 4 samples)."""
        return self.label_noise == "split_half" and self.n >= 4

    def wants_input(self, index: int) -> bool:
        """Whether layer `index` must pass its input to `report` (split-half noise of a deep layer)."""
        return self._splits() and index >= self.n_layers - self.n_group

    @torch.no_grad()
    def report(
        self,
        index: int,
        mean_b: torch.Tensor,
        var_b: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
        x: torch.Tensor | None = None,
    ) -> None:
        """Layer `index` (module order) reports its batch moments against its running statistics
        (and its input `x` where `wants_input(index)`); after the last layer the next batch's
        normalisation is decided."""
        shallow, deep = index < self.n_group, index >= self.n_layers - self.n_group
        if shallow or deep:  # one divergence per layer, also when a short model's groups overlap
            kl = symmetric_kl(mean_b, var_b, mean, var, eps) / self.n_group
            self.scores[0] += kl if shallow else 0.0
            self.scores[1] += kl if deep else 0.0
        if x is not None and self.wants_input(index):
            self.scores[2] += split_half_divergence(x, eps) / self.n_group
        self.reports += 1
        if int(self.reports) == self.n_layers:
            self.last_scores.copy_(self.scores)
            if not self._splits():
                self.last_scores[2] = float("nan")
            shallow, deep = float(self.scores[0]), float(self.scores[1])
            if self.threshold > 0 and shallow > self.threshold and not bool(self.slow):
                self.reset_to.copy_(self.batch)
                self.shifts += 1
            else:
                self.slow.fill_(self.label_threshold > 0 and deep > self._label_bar())
                self.label_batches += int(bool(self.slow))

    @torch.no_grad()
    def check_predictions(self, predicted: torch.Tensor, n_classes: int, max_diversity: float) -> None:
        """After the forward pass: withdraw this batch's label-shift verdict when its `predicted`
        classes are spread too evenly to be a batch of few classes (diversity, the entropy of their
        histogram over log(min(n_classes, batch size)), above `max_diversity`; 1.0: never)."""
        if (
            bool(self.slow)
            and max_diversity < 1.0
            and prediction_diversity(predicted, n_classes) > max_diversity
        ):
            self.slow.fill_(False)
            self.label_batches -= 1

    def _label_bar(self) -> float:
        """The deep score above which the batch counts as label-shifted (see the module docstring)."""
        if self.label_noise == "per_sample":
            # sampling noise alone makes a batch of n samples diverge by about c/n: per sample, so
            # small batches need stronger evidence
            return self.label_threshold / max(1, self.n)
        if not self._splits():  # too few samples to split
            return math.inf
        return self.label_threshold * float(self.scores[2])


def prediction_diversity(predicted: torch.Tensor, n_classes: int) -> float:
    """Entropy of the histogram of the class indices `predicted`, divided by its largest possible
    value log(min(n_classes, len(predicted))): 1 for classes spread evenly, 0 for one class."""
    n = predicted.numel()
    if n < 2 or n_classes < 2:
        return 0.0
    p = torch.bincount(predicted.flatten(), minlength=n_classes).float() / n
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(min(n_classes, n))


def split_half_divergence(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`symmetric_kl` between the per-channel moments of the even and the odd samples of `x`
    (N, C, ...): the sampling noise of a batch's statistics, in the units of its layer."""
    dims = AdaptiveNorm.reduce_dims(x)
    xf = x.float()
    va, ma = fast_moments(xf[0::2], dims)
    vb, mb = fast_moments(xf[1::2], dims)
    return symmetric_kl(ma, va, mb, vb, eps)


def symmetric_kl(
    m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor, eps: float
) -> torch.Tensor:
    """Mean over channels of the symmetric KL divergence (half the sum of both directions) between
    the Gaussians N(m1, v1) and N(m2, v2) of each channel."""
    v1, v2 = v1.float() + eps, v2.float() + eps
    d2 = (m1.float() - m2.float()) ** 2
    return (0.25 * (v1 / v2 + v2 / v1 - 2) + 0.25 * d2 * (1 / v1 + 1 / v2)).mean()


def attach_shift_detector(
    model: nn.Module, threshold: float, label_threshold: float, label_noise: str = "per_sample"
) -> ShiftDetector | None:
    """Give every norm layer of `model` that keeps running test statistics (`attach_detector`) one
    shared detector. None if there are no such layers (e.g. a GroupNorm/LayerNorm model)."""
    layers = [m for m in model.modules() if hasattr(m, "attach_detector")]
    if not layers:
        return None
    detector = ShiftDetector(threshold, label_threshold, len(layers), label_noise=label_noise)
    for i, layer in enumerate(layers):
        layer.attach_detector(detector, i)
    return detector
