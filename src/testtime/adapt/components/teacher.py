"""Teachers and anchors: frozen copies, exponential-moving-average teachers, stochastic restore."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients disabled, in eval mode (an anchor or teacher)."""
    c = copy.deepcopy(model)
    c.requires_grad_(False)
    return c.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, buffers: bool = False) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for parameters (and float buffers)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
    if buffers:
        for tb, sb in zip(teacher.buffers(), student.buffers()):
            if tb.is_floating_point():
                tb.mul_(momentum).add_(sb.detach(), alpha=1.0 - momentum)


@torch.no_grad()
def stochastic_restore(
    model: nn.Module, source_state: dict[str, torch.Tensor], prob: float, generator: torch.Generator
) -> int:
    """Reset each element of every trainable parameter to its source value with probability `prob`.

    Returns the number of restored elements (CoTTA, Wang et al. 2022).
    """
    restored = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mask = torch.rand(p.shape, generator=generator, device="cpu").to(p.device) < prob
        p.copy_(torch.where(mask, source_state[name].to(p.device), p))
        restored.append(mask.sum())
    return int(torch.stack(restored).sum()) if restored else 0  # one device sync, not one per tensor


def param_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of the parameters, keyed by name (a restore point)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
