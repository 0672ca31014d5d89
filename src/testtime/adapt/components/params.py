"""Which parameters adapt: selection of trainable parameters by layer type."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.adapt.components.norm import AdaptiveNorm
from testtime.errors import ModelError

NORM_TYPES = (_BatchNorm, AdaptiveNorm, nn.LayerNorm, nn.GroupNorm)


def norm_affine_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Affine weight/bias of every normalisation layer (BatchNorm, LayerNorm, GroupNorm)."""
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter):
                    out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def all_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())


PARAM_SELECTORS = {"norm": norm_affine_params, "all": all_params}


def select_params(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze every parameter of `model`, then unfreeze and return the selected ones."""
    if which not in PARAM_SELECTORS:
        raise ModelError(f"unknown parameter selection {which!r}; known: {', '.join(PARAM_SELECTORS)}")
    chosen = PARAM_SELECTORS[which](model)
    if not chosen:
        raise ModelError(f"{type(model).__name__} has no parameters of kind {which!r} to adapt")
    model.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    return [p for _, p in chosen]
