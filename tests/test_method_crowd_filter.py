"""Crowd filter: entropy minimisation only on samples whose confidence did not drop."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.selection import confidence_kept

COUNTERS = BOOKKEEPING
N, BS = 256, 64


def _err(a, x, y, bs=BS):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_confidence_drop_on_constructed_probabilities():
    source = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    adapted = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.4, 0.3, 0.3]])
    # kept: more confident in class 0; dropped: class 1 fell from 0.5 to 0.2; kept: equal
    assert confidence_kept(adapted, source).tolist() == [True, False, True]


@pytest.fixture(scope="module")
def stream(noisy_stream):
    x, y = noisy_stream
    return x[:N], y[:N]


def test_crowd_filter_changes_only_bn_affine_and_beats_source(source_model, stream):
    x, y = stream
    a = adapt(source_model, "crowd_filter")
    before = snapshot(a)
    a(x[:BS])
    assert a.counters()["backward_images"] == BS  # first batch: adapted == source, all kept
    err = _err(a, x[BS:], y[BS:])
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    assert changed and changed <= bn_affine_keys(a.model)  # the source copy never changes
    assert a.counters()["forward_images"] == 2 * N  # adapted + source forward per image
    src = _err(adapt(source_model, "source"), x[BS:], y[BS:])
    assert err < src - 5, (src, err)


def test_filter_drops_samples_and_plugs_into_eta_and_sar(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "crowd_filter", lr=0.05)  # a large step makes some confidences drop
    for i in range(0, 2 * BS, BS):
        a(x[i : i + BS])
    with torch.no_grad():
        kept = a.crowd_keep(a.crowd_source_probs(x[2 * BS : 3 * BS]), a.model(x[2 * BS : 3 * BS]))
    assert 0 < int(kept.sum()) < BS
    for method in ("eta", "sar"):
        m = adapt(source_model, method, crowd_filter=True)
        m(x[:BS])
        assert m.crowd is not None and m.counters()["forward_images"] >= 2 * BS
    assert adapt(source_model, "eta").crowd is None
