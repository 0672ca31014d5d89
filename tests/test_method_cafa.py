"""CAFA: Mahalanobis alignment to per-class source Gaussians; BN affine parameters adapt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.source_stats import (
    ClassFeatureStats,
    class_feature_stats,
    mahalanobis,
    regularised_inverse,
)
from testtime.adapt.methods.cafa import class_aware_alignment_loss
from testtime.errors import ConfigError, DataError

COUNTERS = BOOKKEEPING


def _err(a, x, y, bs=100):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


@pytest.fixture(scope="module")
def source_subset():
    from testtime.data.cifar import find_cifar10, load_cifar10

    if find_cifar10() is None:
        pytest.skip("full CIFAR-10 training set not found (set TESTTIME_DATA); CAFA needs source data")
    tr = load_cifar10("train")
    sel = np.random.default_rng(0).permutation(len(tr.y))[:2000]
    return torch.from_numpy(tr.x[sel]).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(
        tr.y[sel]
    ).long()


def test_statistics_and_loss_on_constructed_features():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0], [10.0, 12.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    s = class_feature_stats(feats, labels, 2)
    torch.testing.assert_close(s.means, torch.tensor([[2 / 3, 2 / 3], [32 / 3, 32 / 3]]))
    assert s.covs.shape == (2, 2, 2) and class_feature_stats(feats, labels, 2, "shared").covs.shape == (2, 2)
    prec = regularised_inverse(s.covs, 1e-4)
    d = mahalanobis(torch.tensor([[1.0, 1.0], [11.0, 11.0]]), s.means, prec)
    assert d[0, 0] < d[0, 1] and d[1, 1] < d[1, 0]
    loss = class_aware_alignment_loss(d, torch.tensor([0, 1]))
    wrong = class_aware_alignment_loss(d, torch.tensor([1, 0]))
    assert (loss < wrong).all() and (loss <= 0).all()
    with pytest.raises(DataError, match="missing"):
        class_feature_stats(feats, torch.zeros(6, dtype=torch.long), 2)


def test_cafa_needs_source_statistics(source_model):
    with pytest.raises(DataError, match="source"):
        adapt(source_model, "cafa")
    with pytest.raises(ConfigError, match="covariance"):
        adapt(source_model, "cafa", covariance="diag")


def test_cafa_updates_only_bn_affine_and_beats_source(source_model, noisy_stream, source_subset, tmp_path):
    x, y = noisy_stream
    a = adapt(source_model, "cafa", source_data=source_subset)
    before = snapshot(a)
    err = _err(a, x, y)
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    assert changed and changed <= bn_affine_keys(a.model)
    src = _err(adapt(source_model, "source"), x, y)
    assert err < src - 5, (src, err)
    # the same statistics from a file give the same method
    stats = ClassFeatureStats(a.class_means, torch.linalg.inv(a.class_precisions), torch.ones(10))
    stats.save(tmp_path / "stats.pt")
    b = adapt(source_model, "cafa", stats_path=str(tmp_path / "stats.pt"), cov_eps=0.0)
    torch.testing.assert_close(b.class_precisions, a.class_precisions, rtol=1e-3, atol=1e-3)
