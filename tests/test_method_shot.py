"""SHOT (online): IM + clustering pseudo-labels; feature extractor trains, classifier frozen."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.losses import information_maximization, marginal_entropy
from testtime.adapt.methods.shot import cluster_pseudo_labels
from testtime.errors import ConfigError, ModelError

COUNTERS = BOOKKEEPING


def _err(a, x, y, bs=50):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_information_maximization_on_constructed_logits():
    confident_diverse = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    confident_collapsed = torch.tensor([[20.0, 0.0], [20.0, 0.0]])
    uniform = torch.zeros(2, 2)
    im = [float(information_maximization(z)) for z in (confident_diverse, confident_collapsed, uniform)]
    assert im[0] == pytest.approx(-torch.log(torch.tensor(2.0)).item(), abs=1e-3)  # the optimum
    assert im[1] == pytest.approx(0.0, abs=1e-3) and im[2] == pytest.approx(0.0, abs=1e-3)
    # MEMO's log-space marginal entropy equals the plain one
    z = torch.randn(5, 4)
    p = z.softmax(1).mean(0)
    torch.testing.assert_close(marginal_entropy(z), -(p * p.log()).sum())


def test_clustering_relabels_by_feature_centroids():
    # two tight feature clusters; the classifier is confidently wrong on one member of cluster A
    feats = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.9, 0.1], [0.0, 1.0], [0.05, 0.95], [0.1, 0.9]])
    logits = torch.tensor([[4.0, 0, 0], [4.0, 0, 0], [0, 4.0, 0], [0, 4.0, 0], [0, 4.0, 0], [0, 4.0, 0]])
    labels = cluster_pseudo_labels(feats, logits)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    # a class nobody predicts is never a pseudo-label, even if its centroid would be closest
    logits3 = torch.tensor([[4.0, 0, 3.9]] * 3 + [[0, 4.0, 3.9]] * 3)
    assert set(cluster_pseudo_labels(feats, logits3).tolist()) <= {0, 1}


def test_shot_changes_feature_extractor_only(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "shot")
    before = snapshot(a)
    a(x[:64])
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    trainable = {f"model.{n}" for n, p in a.model.named_parameters() if not n.startswith("fc.")}
    assert changed == trainable
    assert not any(k.startswith("model.fc.") for k in changed)
    assert not any("running_" in k for k in changed)


def test_shot_beats_source(source_model, noisy_stream):
    x, y = noisy_stream
    src = _err(adapt(source_model, "source"), x, y)
    bn = _err(adapt(source_model, "bn"), x, y)
    shot = _err(adapt(source_model, "shot"), x, y)
    shot_im = _err(adapt(source_model, "shot", pseudo_labels="none"), x, y)
    assert shot < src - 5 and shot_im < src - 5, (src, shot, shot_im)
    assert shot < bn + 3, (bn, shot)  # the paper makes no claim over BN; it must not break it


def test_shot_bad_config_and_model():
    with pytest.raises(ConfigError, match="pseudo_labels"):
        adapt(torch.nn.Linear(2, 2), "shot", pseudo_labels="kmeans")
    with pytest.raises(ConfigError, match="cls_par"):
        adapt(torch.nn.Linear(2, 2), "shot", cls_par=-1)
    with pytest.raises(ModelError, match="BatchNorm"):
        adapt(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), "shot")
    with pytest.raises(ModelError, match="Linear"):
        adapt(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), "shot")
