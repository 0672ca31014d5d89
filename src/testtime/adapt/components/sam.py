"""Sharpness-aware minimisation (Foret et al., ICLR 2021) as a two-pass update around any optimiser.

`SharpnessAware` perturbs the trainable parameters to `w + rho * g / ||g||` (or the adaptive
variant `w + rho * w^2 g / ||w g||`), and restores them exactly; `sam_update` runs the whole
update (first backward, ascent, second forward/backward, restore, base optimiser step) for an
`AdaptedModel`, with the same non-finite guards and backward counting as
`AdaptedModel.backward_and_step`. As in the SAM code used by SAR, the ascent direction is the
gradient of the first loss and the base optimiser steps with the gradient at the perturbed point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from testtime.adapt.base import AdaptedModel


class SharpnessAware:
    """Ascent step of SAM over `params` with radius `rho`; `adaptive` gives ASAM's scaling."""

    def __init__(self, params: list[nn.Parameter], rho: float = 0.05, adaptive: bool = False) -> None:
        self.params, self.rho, self.adaptive = list(params), float(rho), adaptive
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    def grad_norm(self) -> torch.Tensor:
        norms = [
            ((p.abs() if self.adaptive else 1.0) * p.grad).norm(p=2)
            for p in self.params
            if p.grad is not None
        ]
        return torch.stack(norms).norm(p=2) if norms else torch.zeros(())

    @torch.no_grad()
    def ascend(self) -> None:
        """Move to `w + e(w)` using the current gradients (kept copies restore `w` exactly)."""
        scale = self.rho / (self.grad_norm() + 1e-12)
        self._saved = []
        for p in self.params:
            if p.grad is None:
                continue
            self._saved.append((p, p.detach().clone()))
            e = (p.pow(2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e)

    @torch.no_grad()
    def restore(self) -> None:
        """Return to `w`, bit for bit."""
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []


def zero_grad_step(method: AdaptedModel) -> None:
    """An optimiser step with all-zero gradients: what an update on an empty selection amounts
    to in code that backpropagates the mean of an empty loss (SGD momentum still moves)."""
    assert method.optimizer is not None
    for group in method.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    method.optimizer.step()
    method.optimizer.zero_grad(set_to_none=True)


def sam_update(
    method: AdaptedModel,
    sam: SharpnessAware,
    loss: torch.Tensor,
    n_images: int,
    second_loss: Callable[[], tuple[torch.Tensor | None, int]],
) -> bool:
    """One SAM update of `method.optimizer`'s parameters.

    `loss` (from a forward of `n_images` images) gives the ascent direction; `second_loss()` runs
    the forward at the perturbed weights and returns (loss, images in its graph), or
    (None, 0) when it selects nothing, in which case a zero-gradient step is taken. Non-finite
    losses or gradients skip the update (weights unchanged, `n_skipped` counted).
    """
    opt = method.optimizer
    assert opt is not None
    opt.zero_grad(set_to_none=True)
    if not torch.isfinite(loss.detach()):
        method.n_skipped += 1
        return False
    loss.backward()
    method.n_backward += n_images
    if not method.grads_finite():
        opt.zero_grad(set_to_none=True)
        method.n_skipped += 1
        return False
    sam.ascend()
    opt.zero_grad(set_to_none=True)
    try:
        loss2, n2 = second_loss()
        if loss2 is not None and torch.isfinite(loss2.detach()):
            loss2.backward()
            method.n_backward += n2
    finally:
        sam.restore()
    if loss2 is None:
        zero_grad_step(method)
        return True
    if not torch.isfinite(loss2.detach()) or not method.grads_finite():
        opt.zero_grad(set_to_none=True)
        method.n_skipped += 1
        return False
    opt.step()
    opt.zero_grad(set_to_none=True)
    return True
