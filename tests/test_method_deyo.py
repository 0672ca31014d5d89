"""DeYO: entropy + PLPD (patch-shuffle) selection and weighting on BN affine parameters."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.selection import patch_shuffle, plpd
from testtime.errors import ConfigError

COUNTERS = BOOKKEEPING | {"n_reliable", "n_selected"}
N, BS = 256, 64


def _patches(x: torch.Tensor, grid: int) -> list[set[bytes]]:
    n, c, h, w = x.shape
    p = (
        x.reshape(n, c, grid, h // grid, grid, w // grid)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(n, grid * grid, -1)
    )
    return [{row.numpy().tobytes() for row in img} for img in p]


def test_patch_shuffle_permutes_patches_per_image():
    x = torch.rand(3, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    y = patch_shuffle(x, 4, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert _patches(x, 4) == _patches(y, 4)  # same 16 patches of 8 x 8, new positions
    assert torch.equal(patch_shuffle(x, 1, g), x)
    z = patch_shuffle(torch.rand(2, 3, 30, 30), 4, g)  # not a multiple of 4: resized and back
    assert z.shape == (2, 3, 30, 30)


def test_plpd_on_constructed_probabilities():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    q = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    torch.testing.assert_close(plpd(p, q), torch.tensor([0.5, 0.0]))  # class 0 lost 0.5; unchanged


def test_bad_config_fails():
    with pytest.raises(ConfigError, match="aug_type"):
        adapt(torch.nn.Linear(2, 2), "deyo", aug_type="occ")


@pytest.fixture(scope="module")
def stream(noisy_stream):
    x, y = noisy_stream
    return x[:N], y[:N]


def _err(a, x, y, bs=BS):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_deyo_changes_only_bn_affine_and_beats_source(source_model, stream):
    x, y = stream
    a = adapt(source_model, "deyo")
    before = snapshot(a)
    err = _err(a, x, y)
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    keys = bn_affine_keys(a.model)
    assert changed & keys and changed <= keys
    assert 0 < int(a.n_selected) < int(a.n_reliable) < N  # both filters drop samples
    c = a.counters()
    assert c["forward_images"] == N + int(a.n_reliable)  # the destroyed images of reliable samples
    src = _err(adapt(source_model, "source"), x, y)
    assert err < src - 5, (src, err)


def test_thresholds_gate_the_update(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "deyo", plpd_threshold=1.0)  # PLPD <= 1: nothing passes
    s0 = snapshot(a)
    a(x[:BS])
    assert int(a.n_reliable) > 0 and int(a.n_selected) == 0
    assert a.counters()["backward_images"] == 0
    assert not changed_keys(s0, snapshot(a)) & bn_affine_keys(a.model)
    b = adapt(source_model, "deyo", e_margin=1e-6)
    b(x[:BS])
    assert b.counters()["forward_images"] == BS  # no reliable sample: no destroyed forward
