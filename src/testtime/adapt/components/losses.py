"""Unsupervised test-time losses, per sample (reduce with the method's weighting)."""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits), per sample."""
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def cross_entropy_soft(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(logits) against softmax(target_logits), per sample."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


def symmetric_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Symmetric CE between student and teacher predictions, per sample (RMT, Döbler et al. 2023)."""
    return alpha * cross_entropy_soft(student, teacher) + (1 - alpha) * cross_entropy_soft(teacher, student)
