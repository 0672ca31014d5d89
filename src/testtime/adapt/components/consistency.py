"""Teacher-student building blocks: parameter EMA, contrastive view alignment, projection heads,
weight ensembling with the source, certainty/diversity weighting and prior correction."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def trainable_pairs(target: nn.Module, source: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters of `target` and `source` (same architecture) where the source one requires grad."""
    pairs = [
        (t, s)
        for (nt, t), (ns, s) in zip(target.named_parameters(), source.named_parameters(), strict=True)
        if s.requires_grad
    ]
    return [t for t, _ in pairs], [s for _, s in pairs]


@torch.no_grad()
def ema_(targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, in place, for tensor lists."""
    if targets:
        torch._foreach_lerp_(targets, [s.detach() for s in sources], 1.0 - momentum)


class SourceWeights(nn.Module):
    """Frozen source copy of the trainable parameters of a model (buffers), for weight ensembling:
    `theta <- m * theta + (1 - m) * theta_source` (ROID, Marsden et al. 2024)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.n = len(params)
        for i, p in enumerate(params):
            self.register_buffer(f"w{i}", p.detach().clone())

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(self.n)]

    @torch.no_grad()
    def ensemble_(self, params: list[nn.Parameter], momentum: float) -> None:
        """Pull `params` towards the source values with `momentum` (1 = no change)."""
        ema_(list(params), self.tensors(), momentum)


def projection_head(in_dim: int, out_dim: int, generator: torch.Generator) -> nn.Sequential:
    """Linear-ReLU-Linear projector (RMT), initialised like nn.Linear but from `generator`."""
    head = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))
    with torch.no_grad():
        for m in head:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    return head


def multiview_contrastive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon-style loss without labels over views (N, V, D): each (sample, view) is an anchor whose
    positives are the other views of the same sample ("all" contrast mode; Khosla et al. 2020, as
    used by RMT). `z` should already be projected; it is L2-normalised here."""
    n, v, _ = z.shape
    feats = F.normalize(torch.cat(z.unbind(1), 0), p=2, dim=1)  # (V*N, D), view-major
    sim = feats @ feats.T / temperature
    logits = sim - sim.max(1, keepdim=True).values.detach()
    idx = torch.arange(n * v, device=z.device)
    not_self = (idx[:, None] != idx[None, :]).to(logits.dtype)
    positive = ((idx[:, None] % n) == (idx[None, :] % n)).to(logits.dtype) * not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(1, keepdim=True))
    return -((positive * log_prob).sum(1) / positive.sum(1)).mean()


def nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar prototype (C, D) for every feature row (N, D)."""
    sim = F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T
    return sim.argmax(1)


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Class-wise mean features (C, D); classes without samples take the `fallback` row."""
    c = fallback.shape[0]
    onehot = F.one_hot(labels, c).to(features.dtype)  # (N, C)
    counts = onehot.sum(0)
    means = onehot.T @ features / counts.clamp_min(1)[:, None]
    return torch.where(counts[:, None] > 0, means, fallback.to(features.dtype))


def roid_checks(cfg: Any, by_norm_type: bool = False) -> list[tuple[str, bool, str]]:
    """Config checks shared by every recipe with ROID's weighting, source ensembling and SLR loss
    (fields momentum_src, momentum_probs, temperature, slr_clip, slr_eps). `by_norm_type`: the
    recipe also accepts momentum_src None (chosen from the model's normalisation layers)."""
    unset = by_norm_type and cfg.momentum_src is None
    return [
        (
            "momentum_src",
            unset or (cfg.momentum_src is not None and 0 <= cfg.momentum_src <= 1),
            "must be in [0, 1]" + (" or None (by the model's norm layers)" if by_norm_type else ""),
        ),
        ("momentum_probs", 0 <= cfg.momentum_probs <= 1, "must be in [0, 1]"),
        ("temperature", 0 < cfg.temperature < float("inf"), "must be > 0"),
        ("slr_clip", 0 < cfg.slr_clip < 1, "must be in (0, 1)"),
        ("slr_eps", cfg.slr_eps > 0, "must be > 0"),
    ]


@torch.no_grad()
def certainty_diversity_weights(
    logits: torch.Tensor, class_probs_ema: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROID sample weights and the kept-sample mask.

    Diversity: 1 - cos(softmax, running class distribution); certainty: negative entropy; both
    min-max normalised over the batch; weight = exp(div * cert / temperature); samples whose
    diversity is below the batch mean are dropped (weight 0, mask False).
    """
    probs = logits.softmax(1)
    div = 1 - F.cosine_similarity(class_probs_ema.unsqueeze(0), probs, dim=1)
    div = (div - div.min()) / (div.max() - div.min())
    keep = ~(div < div.mean())
    cert = (probs * logits.log_softmax(1)).sum(1)
    cert = (cert - cert.min()) / (cert.max() - cert.min())
    weights = torch.exp(div * cert / temperature) * keep
    return weights, keep


def prior_correction(logits: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    """ROID's prior correction: scale the outputs by the smoothed batch label prior.

    As in the official code the (logit) outputs are multiplied by the smoothed prior
    `(p + s) / (1 + s C)` with `s = max(1/N, 1/C) / max(p)` and p the batch-mean softmax. Those
    factors sum to 1 over the C classes, so they also shrink every logit about C-fold (softmax
    probabilities near 1/C: high NLL and calibration error). `rescale=True` multiplies the factors
    by C (mean 1; an even prior leaves the logits as they are): the same predictions, probabilities
    on the model's own scale. Our addition, not ROID's.
    """
    n, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1.0 / n, 1.0 / c) / prior.max()
    factors = (prior + smooth) / (1 + smooth * c)
    return logits * (factors * c if rescale else factors)
