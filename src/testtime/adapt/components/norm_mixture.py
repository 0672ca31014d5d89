"""Normalisation policies that mix statistics: UnMix-TNS components, differentiable mixed stats.

UnMixNorm: Tomar, Vray, Thiran, Bozorgtabar. "Un-Mixing Test-Time Normalization Statistics:
Combatting Label Temporal Correlation." ICLR 2024.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.adapt.components.norm import AdaptiveNorm, MixedStatsNorm
from testtime.errors import ModelError


class UnMixNorm(AdaptiveNorm):
    """Each instance is normalised with the mixture of K statistics components, each component
    first moved towards the instance's own statistics by its soft assignment; the components then
    follow the assigned instances by a momentum update. Works with any batch size.

    Components start at the source statistics: means perturbed by
    `sqrt(init_coeff * K / (K - 1)) * source_std * N(0, 1)` and variances scaled by
    `1 - init_coeff`, so that the mixture of the K components matches the source statistics in
    expectation. Assignments are softmax(cosine(instance mean, component mean) / temperature).
    The momentum for a batch of n is `1 - (1 - base_momentum) ** (n / batch_size_max)`.
    """

    def __init__(
        self,
        bn: _BatchNorm,
        num_components: int = 16,
        base_momentum: float = 0.1,
        batch_size_max: int = 64,
        temperature: float = 0.07,
        init_coeff: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(bn)
        if num_components < 1:
            raise ModelError(f"num_components must be >= 1, got {num_components}")
        k = num_components
        self.base_momentum, self.batch_size_max, self.temperature = base_momentum, batch_size_max, temperature
        mean = self.running_mean.detach().float()
        var = self.running_var.detach().float()
        coeff = init_coeff if k > 1 else 0.0
        noise = torch.randn((k, len(mean)), generator=generator).to(mean.device) if k > 1 else 0.0
        scale = math.sqrt(coeff * k / (k - 1)) if k > 1 else 0.0
        self.register_buffer("component_mean", mean.repeat(k, 1) + scale * var.sqrt() * noise)
        self.register_buffer("component_var", (1 - coeff) * var.repeat(k, 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, components={self.component_mean.shape[0]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = list(range(2, x.dim()))
        if not dims:
            raise ModelError("UnMixNorm needs inputs with spatial dimensions (N, C, ...)")
        inst_var, inst_mean = torch.var_mean(x, dim=dims, correction=0)  # (B, C)
        with torch.no_grad():
            sim = F.normalize(inst_mean, dim=1) @ F.normalize(self.component_mean, dim=1).T
            p = (sim / self.temperature).softmax(1).unsqueeze(-1)  # (B, K, 1)
        mean_bk = (1 - p) * self.component_mean + p * inst_mean.unsqueeze(1)  # (B, K, C)
        var_bk = (1 - p) * self.component_var + p * inst_var.unsqueeze(1)
        mean = mean_bk.mean(1)
        var = var_bk.mean(1) + (mean_bk**2).mean(1) - mean**2
        with torch.no_grad():
            m = 1 - (1 - self.base_momentum) ** (x.shape[0] / self.batch_size_max)
            self.component_mean += m * (p * (inst_mean.unsqueeze(1) - self.component_mean)).mean(0)
            self.component_var += m * (p * (inst_var.unsqueeze(1) - self.component_var)).mean(0)
        return affine_normalize(x, mean, var, self)


def affine_normalize(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: AdaptiveNorm
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias, with (C,) or (N, C) statistics; differentiable
    through the statistics (F.batch_norm in eval mode is not)."""
    spatial = [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale if norm.bias is None else norm.bias - mean * scale
    shape = (*mean.shape, *spatial) if mean.dim() == 2 else (1, -1, *spatial)
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


class GradMixedStatsNorm(MixedStatsNorm):
    """MixedStatsNorm whose output is differentiable through the batch statistics (for methods
    that train while normalising with mixed source/batch statistics, e.g. Core)."""

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return affine_normalize(x, mean, var, self)
