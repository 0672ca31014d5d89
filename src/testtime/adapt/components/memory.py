"""Memory banks of test samples held in registered buffers (fixed capacity + fill flags).

`CategoryBalancedMemory` is the category-balanced sampling with timeliness and uncertainty (CSTU)
of RoTTA (Yuan et al. 2023).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class LazyDataBuffer(nn.Module):
    """Holds a `data` buffer whose per-item shape is fixed by the first stored item.

    Loading a state dict resizes the buffer to the stored shape first, so `reset()` restores an
    empty (not yet allocated) memory exactly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("data", torch.zeros(0))

    def ensure(self, capacity: int, item: torch.Tensor) -> None:
        """Allocate (capacity, *item.shape) on first use; check later items match."""
        shape = (capacity, *item.shape)
        if self.data.numel() == 0:
            self.data = torch.zeros(shape, dtype=item.dtype, device=item.device)
        elif tuple(self.data.shape) != shape:
            from testtime.errors import DataError

            raise DataError(
                f"memory holds items of shape {tuple(self.data.shape[1:])}, got {tuple(item.shape)}"
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        incoming = state_dict.get(prefix + "data")
        if incoming is not None and incoming.shape != self.data.shape:
            self.data = torch.empty_like(incoming, device=self.data.device)
        super()._load_from_state_dict(state_dict, prefix, *args)


class CategoryBalancedMemory(nn.Module):
    """CSTU memory: at most `capacity` samples, balanced over pseudo-label classes.

    A new sample (pseudo-label c, uncertainty u) is stored if its class holds fewer than
    capacity / num_classes samples and the memory has room; otherwise the stored sample with the
    highest score `lambda_t * sigmoid(age / capacity) + lambda_u * u / ln(C)` among the majority
    classes (or, if class c is full, among class c) is evicted when its score exceeds the new
    sample's (age 0); else the new sample is dropped. Every stored sample ages by one per offered
    sample. Ties are broken as the official code (last in class-then-insertion order).
    """

    def __init__(self, capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> None:
        super().__init__()
        self.capacity, self.num_classes = int(capacity), int(num_classes)
        self.per_class = self.capacity / self.num_classes
        self.lambda_t, self.lambda_u = float(lambda_t), float(lambda_u)
        self.items = LazyDataBuffer()
        self.register_buffer("label", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("uncertainty", torch.zeros(self.capacity))
        self.register_buffer("age", torch.zeros(self.capacity, dtype=torch.long))
        self.register_buffer("stamp", torch.zeros(self.capacity, dtype=torch.long))  # insertion order
        self.register_buffer("filled", torch.zeros(self.capacity, dtype=torch.bool))
        self.register_buffer("n_offered", torch.zeros((), dtype=torch.long))

    def score(self, age: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        return self.lambda_t / (1 + torch.exp(-age / self.capacity)) + self.lambda_u * uncertainty / math.log(
            self.num_classes
        )

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.label[self.filled], minlength=self.num_classes)

    def occupancy(self) -> int:
        return int(self.filled.sum())

    def _evict_from(self, classes: torch.Tensor, new_score: float) -> bool:
        """Evict the highest-score sample of `classes` if it beats `new_score`; True if room was made."""
        cand = self.filled & torch.isin(self.label, classes)
        if not bool(cand.any()):
            return True
        scores = self.score(self.age.to(self.uncertainty.dtype), self.uncertainty)
        scores = torch.where(cand, scores, torch.full_like(scores, -math.inf))
        best = scores.max()
        # ties: the last one in (class, insertion) order, as the official list scan with `>=`
        key = torch.where(
            cand & (scores == best), self.label * (2**40) + self.stamp, torch.full_like(self.stamp, -1)
        )
        i = int(key.argmax())
        if float(best) > new_score:
            self.filled[i] = False
            return True
        return False

    @torch.no_grad()
    def add(self, x: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer one sample; returns whether it was stored. All stored samples age by one."""
        self.items.ensure(self.capacity, x)
        new_score = float(self.score(torch.tensor(0.0), torch.tensor(float(uncertainty))))
        counts = self.class_counts()
        if counts[label] < self.per_class:
            if self.occupancy() < self.capacity:
                room = True
            else:
                majority = torch.nonzero(counts == counts.max()).flatten()
                room = self._evict_from(majority.to(self.label.device), new_score)
        else:
            room = self._evict_from(torch.tensor([label], device=self.label.device), new_score)
        if room:
            i = int(torch.nonzero(~self.filled)[0])
            self.items.data[i] = x
            self.label[i], self.uncertainty[i], self.age[i] = label, uncertainty, 0
            self.stamp[i] = self.n_offered
            self.filled[i] = True
        self.age += self.filled.long()
        self.n_offered += 1
        return room

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored samples (class, then insertion order) and their ages divided by the capacity."""
        idx = torch.nonzero(self.filled).flatten()
        order = idx[torch.argsort(self.label[idx] * (2**40) + self.stamp[idx])]
        return self.items.data[order], self.age[order].float() / self.capacity


def timeliness_weights(ages: torch.Tensor) -> torch.Tensor:
    """RoTTA's timeliness re-weighting of memory samples: `exp(-a) / (1 + exp(-a))`, with `a` the
    age divided by the capacity (as returned by `CategoryBalancedMemory.contents`); 0.5 when new."""
    return torch.exp(-ages) / (1 + torch.exp(-ages))
