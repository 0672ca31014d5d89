"""Collapse guard: watch an adapting model's predictions and restore a good state on collapse.

Generalises SAR's model recovery (Niu et al., ICLR 2023: reset when an entropy average falls
below a constant) and RDumb's periodic reset (Press et al., NeurIPS 2023) into one component any
method gets through its config (`guard*` fields of `MethodConfig`).

Detection is two-stage so that it costs nothing while the model is healthy:

1. Alarm (free: uses the logits the method already produced). One class takes more than
   `guard_max_class_fraction` of the last `guard_window` predictions, or the diversity of those
   predictions (entropy of their class histogram / ln C) falls below `guard_min_diversity` (a
   collapse onto a few classes), or the exponential average of the batches' mean normalised
   prediction entropy falls below `guard_min_entropy`.
2. Confirmation (one extra forward pass of the frozen source model, only while an alarm is on),
   on the current batch: the adapted model's predictions are less than half as diverse as the
   source model's, or its most-predicted class k covers at least half of the batch while the
   source model predicts k for less than half as many samples; but never when k is also the source
   model's most-predicted class with at least a quarter of the batch. Label-correlated streams
   (where a batch truly is mostly one class) raise the alarm but are not confirmed as long as the
   source model also sees that class most (before this exception, an adapted model that got a
   one-class run right was "less diverse" than the source model's errors and was restored: 18
   times on a 40,000-image validation stream of `auto`).

On confirmation the method is restored (to the source state, or to the older of the last two
healthy snapshots with `guard_restore="last_good"`), the batch is answered with the source
model's logits, the restore is logged and counted (`counters()["restores"]`), and the guard's
window is cleared. `guard_reset_every > 0` also restores the source every that many batches
(RDumb: 1,000 steps), without any detection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from testtime.adapt.components.losses import entropy


class CollapseGuard(nn.Module):
    """Running prediction statistics (buffers, so they are saved and reset with the method)."""

    def __init__(
        self,
        window: int,
        max_class_fraction: float,
        min_diversity: float,
        min_entropy: float,
        momentum: float,
    ) -> None:
        super().__init__()
        self.max_class_fraction = max_class_fraction
        self.min_diversity = min_diversity
        self.min_entropy = min_entropy
        self.momentum = momentum
        self.register_buffer("preds", torch.full((window,), -1, dtype=torch.long))  # ring buffer
        self.register_buffer("pos", torch.zeros((), dtype=torch.long))
        self.register_buffer("entropy_ema", torch.full((), float("nan")))

    def clear(self) -> None:
        self.preds.fill_(-1)
        self.pos.zero_()
        self.entropy_ema.fill_(float("nan"))

    @torch.no_grad()
    def observe(self, logits: torch.Tensor) -> str | None:
        """Record a batch's predictions; return the reason of an alarm, or None."""
        logits = logits.detach().float()
        pred = logits.argmax(1)
        n, window = len(pred), len(self.preds)
        idx = (self.pos + torch.arange(min(n, window), device=self.preds.device)) % window
        self.preds[idx] = pred[-window:]
        self.pos.copy_((self.pos + n) % window)
        ent = float(entropy(logits).mean()) / math.log(max(2, logits.shape[1]))
        ema = float(self.entropy_ema)
        ema = ent if math.isnan(ema) else self.momentum * ema + (1 - self.momentum) * ent
        self.entropy_ema.fill_(ema)
        seen = self.preds[self.preds >= 0]
        if len(seen) == window:  # judge the class histogram on a full window only
            counts = torch.bincount(seen)
            top = float(counts.max()) / window
            if top > self.max_class_fraction:
                return f"class {int(counts.argmax())} takes {100 * top:.0f}% of the last {window}"
            div = diversity(seen, logits.shape[1])
            if div < self.min_diversity:
                return f"prediction diversity {div:.2f} < {self.min_diversity:g} over the last {window}"
        if ema < self.min_entropy:
            return f"mean normalised entropy average {ema:.4f} < {self.min_entropy:g}"
        return None

    @staticmethod
    @torch.no_grad()
    def confirms(logits: torch.Tensor, reference: torch.Tensor) -> bool:
        """Whether the batch looks collapsed against the reference (source) model's predictions."""
        pred, ref = logits.argmax(1), reference.argmax(1)
        n_classes = logits.shape[1]
        k = torch.bincount(pred).argmax()
        ours, theirs = float((pred == k).float().mean()), float((ref == k).float().mean())
        if theirs >= 0.25 and int(torch.bincount(ref).argmax()) == int(k):
            return False  # the source model sees the same dominant class: a label-skewed batch
        if diversity(pred, n_classes) < 0.5 * diversity(ref, n_classes):
            return True
        return ours >= 0.5 and theirs < 0.5 * ours


def diversity(pred: torch.Tensor, n_classes: int) -> float:
    """Entropy of the predicted-class histogram / ln C: 0 for one class, 1 for a uniform spread."""
    p = torch.bincount(pred, minlength=n_classes).float() / len(pred)
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(max(2, n_classes))
