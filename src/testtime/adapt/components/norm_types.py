"""Which kinds of normalisation layer a method works with, and what it adapts on each.

BatchNorm (BN) layers hold source running statistics, which test-time methods replace by test-batch
statistics (or mixtures of both). GroupNorm (GN) and LayerNorm (LN) layers normalise every sample
by its own statistics: there is nothing to re-estimate, so on GN/LN models methods adapt the
parameters they train (the norm layers' affine parameters, or all weights) and nothing else.
Methods whose adaptation *is* the BN statistics (BN-adapt, alpha-BN, UnMix-TNS) cannot run on
a GN/LN model.

Every method declares a `NormSupport` (class attribute `norm_support`); `check_norm_support`
runs when a method is constructed (`tt.adapt(...)`), before anything is prepared, and raises one
`ModelError` saying why when the model has none of the kinds of layer the method works with.
`convert_batchnorm` applies a BN statistics policy to the BN layers a model has, leaving GN/LN
layers (and BN-free models) as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from testtime.adapt.components.norm import AdaptiveNorm, batchnorm_layers, convert_norm
from testtime.errors import ModelError

BN, GN, LN = "BatchNorm", "GroupNorm", "LayerNorm"
NORM_KINDS = (BN, GN, LN)
SHORT = {BN: "BN", GN: "GN", LN: "LN"}

# what the method trains (`params`), as the tests check it: the parameters that may change
TRAINS = {
    "none": "nothing trained",
    "norm": "norm affine trained",
    "all": "all weights trained",
    "features": "all but the classifier trained",
}

# where the reference benchmark (Marsden/Döbler, github.com/mariodoebler/test-time-adaptation,
# `classification/methods/*.py`) decides what adapts on GN/LN layers
REFERENCE = "mariodoebler/test-time-adaptation"


def norm_layer_counts(model: nn.Module) -> dict[str, int]:
    """Number of BatchNorm (incl. converted), GroupNorm and LayerNorm layers of `model`."""
    counts = dict.fromkeys(NORM_KINDS, 0)
    for m in model.modules():
        if isinstance(m, (_BatchNorm, AdaptiveNorm)):
            counts[BN] += 1
        elif isinstance(m, nn.GroupNorm):
            counts[GN] += 1
        elif isinstance(m, nn.LayerNorm):
            counts[LN] += 1
    return counts


def _or(kinds: tuple[str, ...] | list[str]) -> str:
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"


@dataclass(frozen=True)
class NormSupport:
    """What a method adapts, by kind of normalisation layer.

    `params`: the parameters it trains (a key of TRAINS; the same on every kind it supports);
    `bn_stats`: how BN layers normalise under it; `kinds`: the kinds it works with (a model needs
    at least one of them); `needs_norm=False`: it also runs on models without any normalisation
    layer; `note`: a qualifier of `params` (e.g. layers it skips); `why`: why other kinds are
    refused; `source`: where the GN/LN behaviour comes from.
    """

    params: str
    bn_stats: str
    kinds: tuple[str, ...] = NORM_KINDS
    needs_norm: bool = True
    note: str = ""
    why: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.params not in TRAINS:
            raise ValueError(f"params must be one of {', '.join(TRAINS)}, got {self.params!r}")
        if not self.kinds or any(k not in NORM_KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {NORM_KINDS}, got {self.kinds}")

    def supports(self, kind: str) -> bool:
        return kind in self.kinds

    def trains(self) -> str:
        return TRAINS[self.params] + (f" ({self.note})" if self.note else "")

    def summary(self) -> str:
        """One line per kind: what adapts on BN, on GN and LN (or why they are refused)."""
        bn = f"BN: {self.bn_stats}, {self.trains()}" if self.supports(BN) else "BN: refused"
        rest = [k for k in (GN, LN) if self.supports(k)]
        refused = [k for k in (GN, LN) if not self.supports(k)]
        parts = [bn]
        if rest:
            parts.append(f"{'/'.join(SHORT[k] for k in rest)}: {self.trains()}")
        if refused:
            parts.append(f"{'/'.join(SHORT[k] for k in refused)}: refused ({self.why or 'not supported'})")
        return "; ".join(parts)

    def check(self, model: nn.Module, method: str) -> None:
        """Raise ModelError when `model` has none of the normalisation layers `method` works with."""
        counts = norm_layer_counts(model)
        present = [k for k in NORM_KINDS if counts[k]]
        if not present and not self.needs_norm:
            return
        if any(self.supports(k) for k in present):
            return
        found = ", ".join(f"{counts[k]} {k}" for k in present) or "none"
        why = f" ({self.why})" if self.why else ""
        raise ModelError(
            f"{method} needs {_or(self.kinds)} layers{why}; {type(model).__name__} has no "
            f"{_or(self.kinds)} layers (its normalisation layers: {found})"
        )


def check_norm_support(model: nn.Module, method: str, support: NormSupport | None) -> None:
    """The early check every method runs at construction (no-op when a method states nothing)."""
    if support is not None:
        support.check(model, method)


def convert_batchnorm(model: nn.Module, policy: type[AdaptiveNorm], **kwargs: Any) -> nn.Module:
    """Apply a BN statistics policy to the BatchNorm layers of `model`, if it has any.

    GroupNorm/LayerNorm layers normalise each sample by itself and are left unchanged; a model
    without BatchNorm is returned as it is (whether the method may run on it is decided earlier,
    by `NormSupport.check`).
    """
    if batchnorm_layers(model):
        convert_norm(model, policy, **kwargs)
    return model


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def guard_groupnorm(model: nn.Module) -> None:
    """Make every GroupNorm of `model` normalise contiguous (NCHW) input.

    Batches reach the model as channels_last; torch 2.13's CPU GroupNorm backward crashes the
    process (segfault) on channels_last input when only the affine parameters need gradients
    (the case of norm-affine adaptation behind a frozen convolution). A forward pre-hook makes
    the input contiguous; it is idempotent and copied with the model (teachers, anchors).
    """
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and _contiguous_input not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_contiguous_input)


# ----------------------------------------------------------------------------- common statements

NORM_AFFINE = NormSupport(
    params="norm",
    bn_stats="test-batch statistics",
    source=f"{REFERENCE}: tent/eata/roid `configure_model` train BN, GN and LN affine parameters",
)
ALL_WEIGHTS = NormSupport(
    params="all",
    bn_stats="test-batch statistics",
    source=f"{REFERENCE}: cotta/rmt `configure_model` train every module (BN with batch statistics)",
)
FROZEN = NormSupport(
    params="none",
    bn_stats="source statistics",
    needs_norm=False,
    source="the network is not changed; works on outputs/features of any classifier",
)
BN_STATISTICS_WHY = "it adapts the BatchNorm statistics; GroupNorm/LayerNorm keep none to adapt"
