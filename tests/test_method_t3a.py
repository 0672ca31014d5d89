"""T3A: frozen network, support set filtered by entropy, prototype classifier."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.feature_memory import ClassSupportSet
from testtime.errors import ConfigError


def _err(a, x, y, bs=100):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_support_filter_keeps_lowest_entropy_per_class():
    s = ClassSupportSet(num_classes=2, per_class=2, dim=2)
    f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    s.add(f, torch.tensor([0, 0, 0, 1]), torch.tensor([0.5, 0.1, 0.3, 0.2]))
    assert torch.equal(s.scores[0], torch.tensor([0.1, 0.3]))  # the 0.5 support was dropped
    assert torch.equal(s.feats[0], f[[1, 2]])
    assert s.scores[1, 0] == 0.2 and torch.isinf(s.scores[1, 1])  # one free slot left
    protos = s.prototypes()
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(protos[1], torch.tensor([0.0, 1.0]))  # empty slot ignored


def test_t3a_starts_from_classifier_and_changes_only_supports(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "t3a")
    fc = source_model.fc
    # warm-up supports are the classifier's weight rows
    stored = a.supports.feats[torch.isfinite(a.supports.scores)]
    assert len(stored) == fc.out_features
    assert {tuple(r.tolist()) for r in stored} == {tuple(r.tolist()) for r in fc.weight.detach()}
    before = snapshot(a)
    a(x[:100])
    changed = changed_keys(before, snapshot(a))
    assert changed - BOOKKEEPING == {"supports.feats", "supports.scores"}
    assert not any(p.requires_grad for p in a.parameters())


def test_t3a_beats_source_and_handles_batch_of_one(source_model, noisy_stream):
    x, y = noisy_stream
    src = _err(adapt(source_model, "source"), x, y)
    t3a = _err(adapt(source_model, "t3a"), x, y)
    assert t3a < src - 2, (src, t3a)
    one = adapt(source_model, "t3a")
    assert one(x[:1]).shape == (1, 10)
    assert torch.isfinite(one.supports.scores).sum() == 11  # classifier rows + the one sample


def test_t3a_rejects_bad_filter():
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ConfigError, match="filter_k"):
        adapt(m, "t3a", filter_k=0)
