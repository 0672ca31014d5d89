"""How normalisation statistics are estimated at test time.

Each policy is a drop-in replacement for a BatchNorm layer that keeps the original affine
parameters (the same `nn.Parameter` objects, so parameter names and optimiser references are
unchanged) and the source running statistics, and decides which (mean, var) normalise a batch,
independently of `train()`/`eval()` mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.errors import DataError, ModelError


class AdaptiveNorm(nn.Module):
    """Base class: a BatchNorm layer whose statistics policy is set by the subclass."""

    needs_batch: bool = False  # whether a batch of >1 sample (or spatial extent) is required

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ModelError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @staticmethod
    def reduce_dims(x: torch.Tensor) -> list[int]:
        return [0, *range(2, x.dim())]

    def batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance of the batch (in float32, also under bf16 autocast)."""
        var, mean = torch.var_mean(x.float(), dim=self.reduce_dims(x), correction=0)
        return mean, var

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        # statistics and affine parameters are float32: normalise in float32 (autocast casts the next layer)
        return F.batch_norm(x.float(), mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def fast_moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over `dims` as E[x^2] - E[x]^2: two plain reductions, which on CPU
    are several times faster than `torch.var_mean` over several dimensions (channels-last too)."""
    mean = x.mean(dims)
    return ((x * x).mean(dims) - mean**2).clamp_min(0), mean


class SourceNorm(AdaptiveNorm):
    """Normalise with the source (training) running statistics: the unadapted model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.running_mean, self.running_var)


class BatchStatsNorm(AdaptiveNorm):
    """Normalise with the statistics of the current test batch (Schneider et al. 2020; Tent)."""

    needs_batch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= x.shape[1]:  # e.g. a batch of one through a BatchNorm1d layer
            raise DataError(
                f"test-batch statistics need more than one value per channel; got input {tuple(x.shape)} "
                "at a BatchNorm layer (use a batch of 2 or more samples)"
            )
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class MixedStatsNorm(AdaptiveNorm):
    """Convex mix of source and batch statistics: `a * source + (1 - a) * batch`.

    A fixed `alpha` gives the alpha-BN of You et al. (2021); `prior_n=N` gives the prior-corrected
    BN of Schneider et al. (2020) with `a = N / (N + n)` for a batch of n samples.
    """

    needs_batch = True

    def __init__(self, bn: _BatchNorm, alpha: float | None = None, prior_n: int | None = None) -> None:
        super().__init__(bn)
        if (alpha is None) == (prior_n is None):
            raise ModelError("MixedStatsNorm needs exactly one of alpha or prior_n")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ModelError(f"alpha must be in [0, 1], got {alpha}")
        if prior_n is not None and prior_n < 0:
            raise ModelError(f"prior_n must be >= 0, got {prior_n}")
        self.alpha, self.prior_n = alpha, prior_n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.batch_moments(x)
        a = self.alpha if self.alpha is not None else self.prior_n / (self.prior_n + x.shape[0])
        return self.normalize(x, a * self.running_mean + (1 - a) * mean, a * self.running_var + (1 - a) * var)


class EMAStatsNorm(AdaptiveNorm):
    """Running statistics updated by an exponential moving average of test batches, then used to
    normalise (the robust BN of RoTTA, Yuan et al. 2023). Works with any batch size."""

    def __init__(self, bn: _BatchNorm, momentum: float) -> None:
        super().__init__(bn)
        self.momentum = float(momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.batch_moments(x)
        m = self.momentum
        mean_t = (1 - m) * self.running_mean + m * mean
        var_t = (1 - m) * self.running_var + m * var
        with torch.no_grad():
            self.running_mean.copy_(mean_t.detach())
            self.running_var.copy_(var_t.detach())
        return self.normalize(x, mean_t, var_t)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm layer or already converted AdaptiveNorm."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (_BatchNorm, AdaptiveNorm))]


def convert_norm(model: nn.Module, policy: type[AdaptiveNorm], **kwargs: float | int | None) -> nn.Module:
    """Replace every BatchNorm layer of `model` (in place) by `policy`; returns the model.

    Raises ModelError when the model has no BatchNorm layer.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no BatchNorm layers; this normalisation policy needs them"
        )
    for name, module in layers:
        if isinstance(module, AdaptiveNorm):
            bn = nn.BatchNorm2d(module.num_features, eps=module.eps)
            bn.weight, bn.bias = module.weight, module.bias
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            module = bn
        new = policy(module, **kwargs)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model


def needs_batch(model: nn.Module) -> bool:
    """Whether any normalisation layer of `model` estimates statistics from the batch."""
    return any(isinstance(m, AdaptiveNorm) and m.needs_batch for m in model.modules())
