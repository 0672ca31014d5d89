"""Unsupervised test-time losses, per sample (reduce with the method's weighting)."""

from __future__ import annotations

import math

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


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Soft likelihood ratio loss, per sample (ROID, Marsden et al. 2024): -sum p log(p / (1 - p)).

    Probabilities are clipped at `clip` so that the ratio stays finite, as in the official code.
    """
    p = logits.softmax(1).clamp(0.0, clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


def marginal_entropy(logits: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Entropy of the mean softmax prediction over the batch (dim 0), a scalar.

    `eps=0` averages in log space (MEMO, Zhang et al. 2022); `eps>0` computes
    `-sum p log(p + eps)` of the mean probabilities (SHOT's diversity term, Liang et al. 2020).
    """
    if eps == 0.0:
        logp = logits.log_softmax(1).logsumexp(0) - math.log(logits.shape[0])
        logp = logp.clamp_min(torch.finfo(logp.dtype).min)
        return -(logp.exp() * logp).sum()
    p = logits.softmax(1).mean(0)
    return -(p * torch.log(p + eps)).sum()


def information_maximization(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SHOT's information-maximisation loss (Liang et al. 2020), a scalar: mean per-sample
    entropy minus the entropy of the mean prediction (confident and diverse predictions)."""
    return entropy(logits).mean() - marginal_entropy(logits, eps)
