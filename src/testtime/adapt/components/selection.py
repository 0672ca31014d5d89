"""Sample selection and re-weighting for entropy-minimisation methods.

Pieces shared by EATA/ETA (Niu et al. 2022), SAR (Niu et al. 2023), DeYO (Lee et al. 2024) and
the crowd filter (Lee et al. 2023): entropy thresholds and weights, the redundancy filter over a
moving average of predictions, the confidence-drop filter against the source model, PLPD with
patch shuffling, and the norm-parameter selection of the SAR/DeYO code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from testtime.adapt.components.norm import BatchStatsNorm, batchnorm_layers, convert_norm
from testtime.adapt.components.params import norm_affine_params
from testtime.adapt.components.teacher import frozen_copy
from testtime.adapt.config import OptimConfig
from testtime.errors import ModelError


@dataclass
class SelectionConfig(OptimConfig):
    """SGD with momentum and an entropy margin (as a fraction of ln C): ETA/EATA, SAR, DeYO."""

    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    e_margin: float = 0.4

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("e_margin", math.isfinite(self.e_margin) and self.e_margin > 0, "must be a positive number"),
        ]


def register_selection_counters(module: nn.Module) -> None:
    """Buffers counting samples that passed the first (entropy) filter and that entered the loss."""
    module.register_buffer("n_reliable", torch.zeros((), dtype=torch.long))
    module.register_buffer("n_selected", torch.zeros((), dtype=torch.long))


# ----------------------------------------------------------------------------- entropy


def entropy_margin(num_classes: int, factor: float) -> float:
    """`factor * ln(C)`: the E0 of EATA/SAR (factor 0.4) and the tau_Ent of DeYO (0.5)."""
    return factor * math.log(num_classes)


def entropy_weights(ent: torch.Tensor, margin: float) -> torch.Tensor:
    """`1 / exp(E - E0)` per sample, without gradient (EATA's re-weighting, DeYO's entropy term)."""
    return torch.exp(margin - ent.detach())


# ----------------------------------------------------------------------------- redundancy


class RedundancyFilter(nn.Module):
    """EATA's non-redundancy filter: a sample is kept when the cosine similarity of its softmax
    output to a moving average of earlier selected outputs is below `epsilon` (in absolute value).

    The average starts empty (every sample passes), is set to the mean of the first non-empty
    selection and then follows `m <- alpha * m + (1 - alpha) * mean(selected)`.
    """

    def __init__(self, num_classes: int, epsilon: float, alpha: float = 0.9) -> None:
        super().__init__()
        self.epsilon, self.alpha = float(epsilon), float(alpha)
        self.register_buffer("mean_probs", torch.zeros(num_classes))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def mask(self, probs: torch.Tensor) -> torch.Tensor:
        """Boolean (B,) mask of non-redundant samples among `probs` (B, C)."""
        if not bool(self.initialised):
            return torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        cos = F.cosine_similarity(self.mean_probs.unsqueeze(0), probs.detach(), dim=1)
        return cos.abs() < self.epsilon

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Move the average towards the mean of the selected samples' `probs` (no-op if none)."""
        if len(probs) == 0:
            return
        new = probs.detach().mean(0)
        if bool(self.initialised):
            self.mean_probs.mul_(self.alpha).add_(new, alpha=1 - self.alpha)
        else:
            self.mean_probs.copy_(new)
            self.initialised.fill_(True)


# ----------------------------------------------------------------------------- crowd filter


def confidence_kept(probs: torch.Tensor, source_probs: torch.Tensor) -> torch.Tensor:
    """Crowd filter (Lee et al. 2023): keep samples whose probability for the source model's
    predicted class has not dropped below the source model's own confidence, shape (B,)."""
    cls = source_probs.argmax(1, keepdim=True)
    return probs.detach().gather(1, cls).squeeze(1) >= source_probs.gather(1, cls).squeeze(1)


# ----------------------------------------------------------------------------- DeYO / PLPD


def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Cut every image into `grid` x `grid` patches and shuffle them (a new order per image).

    Images whose side is not a multiple of `grid` are resized (bilinear) to the nearest lower
    multiple and back, as DeYO does.
    """
    n, c, h, w = x.shape
    ph, pw = max(1, h // grid), max(1, w // grid)
    resized = (ph * grid, pw * grid) != (h, w)
    if resized:
        x = F.interpolate(x, size=(ph * grid, pw * grid), mode="bilinear", align_corners=False)
    patches = x.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    order = torch.rand(n, grid * grid, generator=generator).argsort(1).to(x.device)
    patches = patches[torch.arange(n, device=x.device).unsqueeze(1), order]
    out = (
        patches.reshape(n, grid, grid, c, ph, pw)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(n, c, ph * grid, pw * grid)
    )
    if resized:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out


def plpd(probs: torch.Tensor, destroyed_probs: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference: p(y_hat | x) - p(y_hat | x'), y_hat = argmax p(. | x)."""
    cls = probs.argmax(1, keepdim=True)
    return (probs.gather(1, cls) - destroyed_probs.gather(1, cls)).squeeze(1)


# ----------------------------------------------------------------------------- parameters

# Layers the official SAR and DeYO code never adapt: the last stage of a ResNet (`layer4`), the
# last three blocks and the final norm of a ViT-Base.
TOP_LAYER_PATTERNS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def is_top_layer(module_name: str) -> bool:
    """Whether SAR/DeYO's official parameter collection skips this module (by name)."""
    return module_name == "norm" or any(p in module_name for p in TOP_LAYER_PATTERNS)


def prepare_norm_adaptation(model: nn.Module, skip_top_layers: bool) -> list[nn.Parameter]:
    """SAR/DeYO model setup: BatchNorm layers normalise with batch statistics (if any); only the
    affine parameters of norm layers (BatchNorm, GroupNorm, LayerNorm) train, optionally without
    the top layers the official code skips. Returns the trainable parameters."""
    if batchnorm_layers(model):
        convert_norm(model, BatchStatsNorm)
    chosen = [
        p
        for name, p in norm_affine_params(model)
        if not (skip_top_layers and is_top_layer(name.rpartition(".")[0]))
    ]
    if not chosen:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm/GroupNorm/LayerNorm affine parameters to adapt"
        )
    model.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return chosen


# ----------------------------------------------------------------------------- crowd filter plug-in


class CrowdFilter(nn.Module):
    """A frozen copy of the model as wrapped at setup (source weights, same norm policy), whose
    predictions the crowd filter compares against; `keep(x, probs)` gives the (B,) mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.source = frozen_copy(model)

    @torch.no_grad()
    def source_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.source(x).softmax(1)

    def keep(self, source_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return confidence_kept(probs, source_probs)


class CrowdFilterMixin:
    """Adds an optional `CrowdFilter` (`self.crowd`) to an AdaptedModel; its forward passes count."""

    model: nn.Module
    crowd: CrowdFilter | None

    def setup_crowd(self, enabled: bool) -> None:
        self.crowd = CrowdFilter(self.model) if enabled else None

    def counted_networks(self) -> list[nn.Module]:
        return [self.model] + ([self.crowd.source] if self.crowd is not None else [])

    def crowd_keep(self, source_probs: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Crowd-filter mask for `logits` (all True when the filter is off)."""
        if self.crowd is None or source_probs is None:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
        return self.crowd.keep(source_probs, logits.detach().softmax(1))

    def crowd_source_probs(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.crowd.source_probs(x) if self.crowd is not None else None
