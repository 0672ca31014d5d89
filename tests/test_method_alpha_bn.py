"""alpha-BN: source/test statistics mixed with alpha; Core trains BN affine with a class-correlation loss."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.norm import MixedStatsNorm
from testtime.adapt.methods.alpha_bn import class_correlation_loss
from testtime.errors import ConfigError

COUNTERS = BOOKKEEPING


def _err(a, x, y, bs=100):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_class_correlation_loss_on_constructed_predictions():
    confident_diverse = torch.eye(4) * 50  # each sample a different class, one-hot
    assert float(class_correlation_loss(confident_diverse)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(8, 4)
    assert float(class_correlation_loss(uniform)) == pytest.approx(3 / 4, abs=1e-6)
    mixed = torch.tensor([[5.0, 5.0, -5.0], [-5.0, 5.0, 5.0]])
    assert 0 < float(class_correlation_loss(mixed)) < 2 / 3


def test_mixing_uses_alpha_and_changes_nothing(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "alpha_bn")
    layers = [m for m in a.modules() if isinstance(m, MixedStatsNorm)]
    assert layers and all(m.alpha == 0.9 for m in layers)
    before = snapshot(a)
    a(x[:50])
    assert changed_keys(before, snapshot(a)) <= COUNTERS
    # alpha=1 is the source model, alpha=0 is BN-adapt
    torch.testing.assert_close(
        adapt(source_model, "alpha_bn", alpha=1.0)(x[:20]),
        adapt(source_model, "source")(x[:20]),
        rtol=1e-4,
        atol=1e-4,
    )
    torch.testing.assert_close(
        adapt(source_model, "alpha_bn", alpha=0.0)(x[:20]),
        adapt(source_model, "bn")(x[:20]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_alpha_bn_beats_source_and_bn_with_small_batches(source_model, noisy_stream):
    x, y = noisy_stream
    x, y = x[:200], y[:200]
    src = _err(adapt(source_model, "source"), x, y)
    abn = _err(adapt(source_model, "alpha_bn"), x, y, bs=100)
    assert abn < src - 5, (src, abn)
    bn_small = _err(adapt(source_model, "bn"), x[:64], y[:64], bs=4)
    abn_small = _err(adapt(source_model, "alpha_bn"), x[:64], y[:64], bs=4)
    assert abn_small < bn_small - 5, (bn_small, abn_small)


def test_core_updates_only_bn_affine(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "alpha_bn", core=True)
    before = snapshot(a)
    a(x[:50])
    a(x[50:100])
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    assert changed and changed <= bn_affine_keys(a.model)
    assert a.counters()["backward_images"] == 100


def test_bad_alpha():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="alpha"):
        adapt(m, "alpha_bn", alpha=1.5)
