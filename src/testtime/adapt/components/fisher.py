"""Diagonal Fisher information and the quadratic (EWC-style) anchor penalty built on it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


def pseudo_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against the model's own predictions (labels not needed)."""
    return F.cross_entropy(logits, logits.argmax(1).detach())


def fisher_diagonal(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] = pseudo_label_loss,
) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of `loss_fn(model(x))` for each named parameter.

    This is the empirical diagonal Fisher estimator used by EATA (Niu et al. 2022) with
    pseudo-labels. Gradients of parameters outside `params` are not kept; `model` is unchanged.
    """
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    count = 0
    for x in batches:
        grads = torch.autograd.grad(loss_fn(model(x)), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                fisher[n] += g.detach() ** 2
        count += 1
    for n, p in params.items():
        p.requires_grad_(flags[n])
    return {n: f / max(1, count) for n, f in fisher.items()}


class QuadraticAnchor(nn.Module):
    """`weight * sum_i F_i (theta_i - theta*_i)^2` over named parameters; F and theta* are buffers."""

    def __init__(
        self, params: dict[str, nn.Parameter], fisher: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__()
        self.names = list(params)
        for i, (n, p) in enumerate(params.items()):
            self.register_buffer(f"anchor_{i}", p.detach().clone())
            f = fisher[n] if fisher is not None else torch.ones_like(p)
            self.register_buffer(f"fisher_{i}", f.detach().clone())

    def set_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            getattr(self, f"fisher_{i}").copy_(fisher[n])

    def forward(self, params: dict[str, nn.Parameter]) -> torch.Tensor:
        total = next(iter(params.values())).new_zeros(())
        for i, n in enumerate(self.names):
            diff = params[n] - getattr(self, f"anchor_{i}")
            total = total + (getattr(self, f"fisher_{i}") * diff * diff).sum()
        return total
