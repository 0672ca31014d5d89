"""AdaNPC: adaptive non-parametric classifier.

Zhang, Wang, Jin, Zhang, Tan. "AdaNPC: Exploring Non-Parametric Classifier for Test-Time
Adaptation." ICML 2023.

The network is frozen (source weights and BatchNorm statistics). Predictions come from a kNN
classifier over a memory of L2-normalised penultimate features and labels: the k most
cosine-similar entries vote with weights softmax(similarity / temperature). The memory starts
with the features of the labelled source samples passed as `source_data`; each test sample is
then added with its predicted label when the confidence max(softmax(votes)) >= beta (as in the
official code; with the default beta=0.1 and 10 classes this admits every sample).

| option | default | source |
| --- | --- | --- |
| k | 100 | official code (adaptation `k`) |
| temperature | 0.1 | official code |
| beta | 0.1 | official code |
| test_capacity | 10000 | ours: memory slots for test samples (official: unbounded) |
| bootstrap_threshold | 0.9 | ours: only without source data (see Deviations) |
| source_batch_size | 500 | ours: chunk size for the source feature pass |

Deviations:
- The official memory grows without bound; ours keeps at most `test_capacity` test entries
  (oldest replaced first); the source entries are never replaced.
- The official memory also holds one random vector from its initialisation; ours does not.
- Without `source_data` (not a setting of the paper) the memory starts empty: while it holds
  fewer than k entries the frozen linear classifier predicts, and samples whose classifier
  confidence is >= `bootstrap_threshold` seed the memory; afterwards the method runs as above.
  This mode has no source anchor and can do worse than the source model under strong shift.
- Logits are the log of the vote scores (the official code returns the scores); argmax is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from testtime.adapt.base import AdaptedModel
from testtime.adapt.components.feature_memory import FeatureMemory, knn_vote
from testtime.adapt.components.features import FeatureTap
from testtime.adapt.components.norm_types import FROZEN
from testtime.adapt.components.passes import Passes
from testtime.adapt.components.source_stats import extract_features
from testtime.adapt.config import MethodConfig
from testtime.adapt.registry import register_method


@dataclass
class AdaNPCConfig(MethodConfig):
    k: int = 100
    temperature: float = 0.1
    beta: float = 0.1
    test_capacity: int = 10000
    bootstrap_threshold: float = 0.9
    source_batch_size: int = 500

    def checks(self) -> list[tuple[str, bool, str]]:
        return [
            *super().checks(),
            ("k", self.k >= 1, "must be >= 1"),
            ("temperature", 0 < self.temperature < float("inf"), "must be a positive finite number"),
            ("beta", 0 <= self.beta <= 1, "must be in [0, 1]"),
            ("test_capacity", self.test_capacity >= 1, "must be >= 1"),
            ("bootstrap_threshold", 0 <= self.bootstrap_threshold <= 1, "must be in [0, 1]"),
            ("source_batch_size", self.source_batch_size >= 1, "must be >= 1"),
        ]


@register_method
class AdaNPC(AdaptedModel):
    """kNN vote over a memory of source and pseudo-labelled test features; no weight updates."""

    name = "adanpc"
    Config = AdaNPCConfig
    paper = "Zhang et al., ICML 2023"
    paper_source_samples: ClassVar[int] = 50_000  # the memory starts with all CIFAR training features
    config: AdaNPCConfig

    def setup(self) -> None:
        self.model.requires_grad_(False)
        self.tap = FeatureTap(self.model)
        fc = self.tap.classifier
        self.num_classes = fc.out_features
        n_src = 0 if self.source_data is None else len(self.source_data[1])
        self.memory = FeatureMemory(n_src + self.config.test_capacity, fc.in_features).to(fc.weight.device)
        if self.source_data is not None:
            x, y = self.source_data
            feats, _ = extract_features(self.model, self.tap, x, self.config.source_batch_size)
            self.memory.add(feats, y, protect=True)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        feats, logits = self.tap(self.model, x)
        if len(self.memory) < c.k:  # no source data: bootstrap from confident test samples
            conf, pred = logits.softmax(1).max(1)
            keep = conf >= c.bootstrap_threshold
            self.memory.add(feats[keep], pred[keep])
            return logits
        bank, labels = self.memory.valid()
        scores = knn_vote(feats, bank, labels, c.k, c.temperature, self.num_classes)
        conf, pred = scores.softmax(1).max(1)
        keep = conf >= c.beta
        self.memory.add(feats[keep], pred[keep])
        return scores.log()

    def minimal_passes(self) -> Passes:
        return Passes(1, 0, "one forward gives the features the kNN vote and the memory use")

    norm_support = FROZEN
