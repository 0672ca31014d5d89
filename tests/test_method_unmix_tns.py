"""UnMix-TNS: K statistics components per BN layer; only the components change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import BOOKKEEPING, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.norm_mixture import UnMixNorm
from testtime.errors import ConfigError, ModelError


def _err(a, x, y, bs=100):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def _bn(c=4):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.arange(c, dtype=torch.float) + 1)
    bn.running_var.copy_(torch.full((c,), 4.0))
    return bn


def test_components_initialisation_and_update_on_constructed_input():
    g = torch.Generator().manual_seed(0)
    layer = UnMixNorm(_bn(), num_components=16, generator=g)
    assert layer.component_mean.shape == (16, 4)
    torch.testing.assert_close(layer.component_var, torch.full((16, 4), 2.0))  # (1 - 0.5) * source
    spread = layer.component_mean.std(0)
    assert (spread > 0.5).all() and (spread < 4).all()  # perturbed around the source mean
    one = UnMixNorm(_bn(), num_components=1)
    torch.testing.assert_close(one.component_mean[0], one.running_mean)
    x = torch.randn(8, 4, 5, 5) * 3 + 10
    before = layer.component_mean.clone()
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    moved = (layer.component_mean - before).abs().sum(1)
    assert (moved > 0).all() and torch.equal(layer.running_mean, torch.arange(4.0) + 1)
    # every update moves components towards the instance means (here all ~10)
    assert ((layer.component_mean - 10).abs() <= (before - 10).abs() + 1e-6).all()
    with pytest.raises(ModelError, match="num_components"):
        UnMixNorm(_bn(), num_components=0)


def test_only_components_change(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "unmix_tns")
    before = snapshot(a)
    a(x[:50])
    changed = changed_keys(before, snapshot(a)) - BOOKKEEPING
    assert changed and all(k.endswith(("component_mean", "component_var")) for k in changed)
    assert not any(p.requires_grad for p in a.parameters())


def test_beats_source_and_bn_on_label_sorted_stream(source_model, embedded):
    """The paper's claim: robust to label temporal correlation, where BN collapses.

    Uses the whole embedded set sorted by class (200 images per class, batches of 64): the
    components need a few hundred images per class to separate."""
    from conftest import to_batch
    from testtime.data.corruptions import corrupt

    y = torch.from_numpy(embedded.y)
    o = torch.argsort(y, stable=True)
    x = to_batch(corrupt(embedded.x, "contrast", 5, seed=0))[o]
    ys = y[o]
    src = _err(adapt(source_model, "source"), x, ys, bs=64)
    bn = _err(adapt(source_model, "bn"), x, ys, bs=64)
    um = _err(adapt(source_model, "unmix_tns"), x, ys, bs=64)
    assert um < bn - 10 and um < src - 10, (src, bn, um)


def test_bad_config():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="num_components"):
        adapt(m, "unmix_tns", num_components=0)
    with pytest.raises(ConfigError, match="temperature"):
        adapt(m, "unmix_tns", temperature=0)
    with pytest.raises(ModelError, match="BatchNorm"):
        adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), "unmix_tns")
