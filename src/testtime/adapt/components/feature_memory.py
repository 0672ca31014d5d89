"""Feature-space tools: feature/label memories, kNN votes and graphs, prototype classifiers.

All memories keep fixed-shape registered buffers (capacity + fill count) so that `reset()` and
`state_dict()` of the owning method capture them exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from testtime.errors import ModelError

# ----------------------------------------------------------------------------- memories


class FeatureMemory(nn.Module):
    """A bank of L2-normalised features with integer labels.

    The first `protected` slots (e.g. source features) are never overwritten; later additions
    fill the remaining slots and then replace the oldest of them (first in, first out).
    """

    def __init__(self, capacity: int, dim: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ModelError(f"memory capacity must be >= 1, got {capacity}")
        self.register_buffer("feats", torch.zeros(capacity, dim))
        self.register_buffer("labels", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("protected", torch.zeros((), dtype=torch.long))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    @property
    def capacity(self) -> int:
        return self.feats.shape[0]

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def add(self, feats: torch.Tensor, labels: torch.Tensor, protect: bool = False) -> None:
        """Store `feats` (normalised here) with `labels`; `protect` pins them (before any others)."""
        feats = F.normalize(feats.detach().float(), dim=1)
        n, cap, p = len(feats), self.capacity, int(self.protected)
        if protect:
            if int(self.filled) != p or p + n > cap:
                raise ModelError("protected entries must be added first and fit the capacity")
            self.feats[p : p + n] = feats
            self.labels[p : p + n] = labels
            self.protected += n
            self.filled += n
            self.cursor.fill_(p + n)
            return
        free = cap - p
        if free <= 0 or n == 0:
            return
        if n > free:  # only the newest `free` entries can be kept
            feats, labels, n = feats[-free:], labels[-free:], free
        slots = p + (int(self.cursor) - p + torch.arange(n, device=self.feats.device)) % free
        self.feats[slots] = feats
        self.labels[slots] = labels
        self.filled.fill_(min(cap, int(self.filled) + n))
        self.cursor.fill_(p + (int(self.cursor) - p + n) % free)

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(self.filled)
        return self.feats[:n], self.labels[:n]


def knn_vote(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """Class scores (B, C) from the k most cosine-similar bank entries, weighted by
    softmax(similarity / temperature) over those k (the kNN classifier of AdaNPC).

    `bank` must be L2-normalised. Scores are `(votes + 1e-5).clamp(max=1)`, as in the AdaNPC code.
    """
    sim = F.normalize(query.float(), dim=1) @ bank.T  # (B, N)
    top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)
    w = (top_sim / temperature).softmax(1)
    votes = torch.zeros(len(query), num_classes, dtype=w.dtype, device=w.device)
    votes.scatter_add_(1, bank_labels[top_idx], w)
    return (votes + 1e-5).clamp(max=1.0)


class ClassSupportSet(nn.Module):
    """Per-class support features with a score each, keeping the `per_class` lowest-score
    supports of every class (T3A's entropy filter); empty slots have score +inf."""

    def __init__(self, num_classes: int, per_class: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("feats", torch.zeros(num_classes, per_class, dim))
        self.register_buffer("scores", torch.full((num_classes, per_class), float("inf")))

    @torch.no_grad()
    def add(self, feats: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> None:
        """Merge new supports (features, class labels, scores) and keep the best per class."""
        feats, scores = feats.detach().float(), scores.detach().float()
        m = self.scores.shape[1]
        for c in labels.unique().tolist():
            sel = labels == c
            f = torch.cat([self.feats[c], feats[sel]])
            s = torch.cat([self.scores[c], scores[sel]])
            order = s.argsort(stable=True)[:m]
            self.feats[c] = f[order]
            self.scores[c] = s[order]

    def prototypes(self) -> torch.Tensor:
        """(C, D) unit-norm class prototypes: the normalised sum of the normalised supports."""
        present = torch.isfinite(self.scores).unsqueeze(-1).float()
        summed = (F.normalize(self.feats, dim=-1) * present).sum(1)
        return F.normalize(summed, dim=-1)


# ----------------------------------------------------------------------------- graphs


def knn_affinity(feats: torch.Tensor, k: int) -> torch.Tensor:
    """(N, N) 0/1 matrix with W[i, j] = 1 when j is one of the k nearest neighbours of i
    (Euclidean; a sample is not its own neighbour). Not symmetrised."""
    n = feats.shape[0]
    k = min(k, n - 1)
    w = torch.zeros(n, n, dtype=feats.dtype, device=feats.device)
    if k <= 0:
        return w
    dist = torch.cdist(feats, feats)
    dist.fill_diagonal_(float("inf"))
    w.scatter_(1, dist.topk(k, dim=1, largest=False).indices, 1.0)
    return w


def laplacian_assignment(
    log_probs: torch.Tensor,
    kernel: torch.Tensor,
    weight: float = 1.0,
    max_steps: int = 100,
    tol: float = 1e-8,
) -> torch.Tensor:
    """Laplacian-regularised assignment of LAME (Boudiaf et al. 2022), returned as logits.

    Minimises sum_i KL(z_i || p_i) - weight * sum_ij W_ij z_i.z_j over the simplex by the bound
    (concave-convex) iteration z <- softmax(log p + weight * W z), stopping when the relative
    energy change is <= `tol` or after `max_steps`. softmax of the result is the assignment z.
    """
    unary = -log_probs
    z = log_probs.softmax(1)
    logits, old = log_probs, float("inf")
    for i in range(max_steps):
        pairwise = weight * kernel @ z
        logits = -unary + pairwise
        z = logits.softmax(1)
        energy = float((unary * z - weight * pairwise * z + z * z.clamp_min(1e-20).log()).sum())
        if i > 1 and abs(energy - old) <= tol * abs(old):
            break
        old = energy
    return logits
