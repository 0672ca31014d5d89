"""CAFA: Mahalanobis alignment to per-class source Gaussians; BN affine parameters adapt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.features import FeatureTap
from testtime.adapt.components.source_stats import (
    class_feature_stats,
    extract_features,
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
    feats, _ = extract_features(source_model.eval(), FeatureTap(source_model), source_subset[0])
    class_feature_stats(feats, source_subset[1], 10).save(tmp_path / "stats.pt")
    b = adapt(source_model, "cafa", stats_path=str(tmp_path / "stats.pt"))
    assert torch.equal(b.class_precisions, a.class_precisions) and torch.equal(b.class_means, a.class_means)


def test_regularised_inverse_of_a_batch_of_wide_covariances_on_two_threads():
    """192-d features (the shipped ViT's), where torch 2.13's batched LU inverse can fail on 2 threads."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(10, 40, 192, generator=g, dtype=torch.float64)
    covs = (f.transpose(1, 2) @ f / 40).float()  # rank 40 < 192: only the ridge makes them invertible
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prec = regularised_inverse(covs, 1e-4)
    finally:
        torch.set_num_threads(threads)
    scale = torch.diagonal(covs.double(), dim1=-2, dim2=-1).mean(-1)[:, None, None]
    ridged = covs.double() + 1e-4 * scale * torch.eye(192, dtype=torch.float64)
    ident = torch.eye(192, dtype=torch.float64).expand(10, 192, 192)
    torch.testing.assert_close(ridged @ prec.double(), ident, atol=1e-3, rtol=0)
    with pytest.raises(DataError, match=r"covariance\(s\) \[0, 1, .*cov_eps"):
        regularised_inverse(covs, 0.0)  # rank-deficient without the ridge
