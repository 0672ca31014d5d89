"""MEMO: per-sample marginal entropy over AugMix views, episodic; AugMix in plain torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BOOKKEEPING, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components import augmix
from testtime.errors import ConfigError

COUNTERS = BOOKKEEPING
N = 48  # MEMO is per sample and expensive; a small slice of the stream


def test_augmix_ops_match_pil_semantics():
    g = torch.Generator().manual_seed(0)
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32))).float()
    # integer translation by one pixel: shift, the new column takes the official fill (128, 0, 0)
    out = augmix.affine_pil(img, (1, 0, 1, 0, 1, 0))
    assert torch.equal(out[:, :, :-1], img[:, :, 1:])
    assert out[:, :, -1].tolist() == [[128.0] * 32, [0.0] * 32, [0.0] * 32]
    assert torch.equal(augmix.affine_pil(img, (1, 0, 0, 0, 1, 0)), img)
    # solarize inverts only the brightest values; posterize keeps 4 bits (severity 1)
    sol = augmix.solarize(img, 1.0, g)
    assert torch.equal(sol[img < 230], img[img < 230]) and torch.equal(sol[img >= 255], 255 - img[img >= 255])
    assert torch.equal(augmix.posterize(img, 1.0, g), img - img % 16)
    ac = augmix.autocontrast(img * 0.5 + 10, 1.0, g)
    assert ac.amin(dim=(1, 2)).tolist() == [0.0] * 3 and ac.amax(dim=(1, 2)).tolist() == [255.0] * 3
    eq = augmix.equalize(img, 1.0, g)
    assert eq.shape == img.shape and torch.equal(eq, eq.round())
    for op in augmix.AUGMIX_OPS:
        o = op(img, 1.0, g)
        assert o.shape == img.shape and o.min() >= 0 and o.max() <= 255 and torch.equal(o, o.round())


def test_augmix_views_are_seeded_and_in_range():
    x = torch.rand(3, 32, 32)
    a = augmix.AugMix()(x, 6, torch.Generator().manual_seed(1))
    b = augmix.AugMix()(x, 6, torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a[0], a[1])


def test_memo_is_episodic_and_adapts_per_sample(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "memo", n_augmentations=4)
    before = snapshot(a)
    out = a(x[:3])
    assert out.shape == (3, 10)
    # weights are back to the source after every sample: only counters and the rng moved
    assert changed_keys(before, snapshot(a)) <= COUNTERS
    c = a.counters()
    assert c["forward_images"] == 3 * (4 + 1) and c["backward_images"] == 3 * 4
    # each prediction equals that of a fresh copy adapted on that sample alone (same rng draws)
    b = adapt(source_model, "memo", n_augmentations=4)
    b(x[:1])
    torch.testing.assert_close(b(x[1:2]), out[1:2], rtol=0, atol=0)
    # and it differs from the unadapted prediction with the same BatchNorm prior
    frozen = adapt(source_model, "memo", n_augmentations=4, lr=1e-30)
    assert not torch.equal(frozen(x[:3]), out)


def test_memo_beats_source(source_model, noisy_stream):
    x, y = noisy_stream
    x, y = x[:N], y[:N]
    src = adapt(source_model, "source")(x).argmax(1)
    no_adapt = adapt(source_model, "memo", n_augmentations=16, lr=1e-30)(x).argmax(1)  # prior BN only
    memo = adapt(source_model, "memo", n_augmentations=16)(x).argmax(1)
    err = [100.0 * float((p != y).float().mean()) for p in (src, no_adapt, memo)]
    assert err[2] < err[0] - 4, err
    assert err[2] <= err[1], err  # the marginal-entropy step itself helps, beyond the BN prior


def test_memo_bad_config():
    with pytest.raises(ConfigError, match="n_augmentations"):
        adapt(torch.nn.Linear(2, 2), "memo", n_augmentations=1)
    with pytest.raises(ConfigError, match="prior_strength"):
        adapt(torch.nn.Linear(2, 2), "memo", prior_strength=-1)
