"""ETA / EATA: entropy + redundancy selection, entropy re-weighting, Fisher anti-forgetting."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.fisher import fisher_diagonal
from testtime.adapt.components.selection import RedundancyFilter, entropy_margin, entropy_weights
from testtime.errors import ConfigError, ModelError

COUNTERS = BOOKKEEPING | {"n_reliable", "n_selected"}
N, BS = 256, 64


def _err(a, x, y, bs=BS):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_selection_components_on_constructed_inputs():
    assert entropy_margin(10, 0.4) == pytest.approx(0.4 * math.log(10))
    w = entropy_weights(torch.tensor([0.0, 1.0, 2.0], requires_grad=True), 1.0)
    torch.testing.assert_close(w, torch.exp(torch.tensor([1.0, 0.0, -1.0])))
    assert not w.requires_grad  # weights are constants in the loss
    f = RedundancyFilter(num_classes=3, epsilon=0.9, alpha=0.9)
    a, b = torch.tensor([[0.8, 0.1, 0.1]]), torch.tensor([[0.1, 0.1, 0.8]])
    assert f.mask(torch.cat([a, b])).all()  # empty average: nothing is redundant
    f.update(torch.cat([a, a]))
    torch.testing.assert_close(f.mean_probs, a[0])  # first selection sets the average
    assert f.mask(torch.cat([a, b])).tolist() == [False, True]  # |cos| >= 0.9 is redundant
    f.update(torch.empty(0, 3))  # no selection: unchanged
    torch.testing.assert_close(f.mean_probs, a[0])
    f.update(b)
    torch.testing.assert_close(f.mean_probs, 0.9 * a[0] + 0.1 * b[0])


def test_bad_config_and_model_fail_clearly():
    with pytest.raises(ConfigError, match="d_margin"):
        adapt(torch.nn.Linear(2, 2), "eta", d_margin=0)
    with pytest.raises(ConfigError, match="fisher_size"):
        adapt(torch.nn.Linear(2, 2), "eata", fisher_size=0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    with pytest.raises(ModelError, match="BatchNorm"):
        adapt(plain, "eata")


@pytest.fixture(scope="module")
def stream(noisy_stream):
    x, y = noisy_stream
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def source_err(source_model, stream):
    return _err(adapt(source_model, "source"), *stream)


def test_eta_changes_only_bn_affine_and_beats_source(source_model, stream, source_err):
    x, y = stream
    a = adapt(source_model, "eta")
    before = snapshot(a)
    err = _err(a, x, y)
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    assert changed - bn_affine_keys(a.model) == {"redundancy.mean_probs", "redundancy.initialised"}
    assert changed & bn_affine_keys(a.model)
    assert 0 < int(a.n_selected) <= int(a.n_reliable) < N  # both filters are active
    assert err < source_err - 5, (source_err, err)
    assert a.counters()["forward_images"] == N


def test_eata_fisher_from_first_test_batch_then_adapts(source_model, stream, source_err):
    x, y = stream
    a = adapt(source_model, "eata")
    ref = adapt(source_model, "eata", fisher_alpha=0.0)  # same model, never estimates a Fisher
    expected = fisher_diagonal(ref.model, ref.named, [x[:BS]])
    before = snapshot(a)
    err = _err(a, x, y)
    for n, f in a.fisher().items():
        torch.testing.assert_close(f, expected[n], rtol=1e-4, atol=1e-8)
    assert int(a.fisher_batches) == 1 and int(a.fisher_needed) == 0
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    fisher_keys = {k for k in changed if k.startswith("anchor.fisher_")}
    assert fisher_keys and not any(k.startswith("anchor.anchor_") for k in changed)  # theta^0 fixed
    extra = {"redundancy.mean_probs", "redundancy.initialised", "fisher_batches", "fisher_needed"}
    assert changed - bn_affine_keys(a.model) == fisher_keys | extra
    assert err < source_err - 5, (source_err, err)
    # one extra backward (the Fisher) over the first batch
    assert a.counters()["backward_images"] <= N + BS


def test_eata_defers_adaptation_until_fisher_size_and_accepts_source_data(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "eata", fisher_size=2 * BS)
    keys = bn_affine_keys(a.model)
    s0 = snapshot(a)
    a(x[:BS])
    assert not changed_keys(s0, snapshot(a)) & keys  # first batch: Fisher only
    assert int(a.fisher_needed) == BS
    a(x[BS : 2 * BS])
    assert int(a.fisher_needed) == 0 and changed_keys(s0, snapshot(a)) & keys
    b = adapt(
        source_model, "eata", source_data=(x[:100], torch.zeros(100, dtype=torch.long)), fisher_size=100
    )
    assert int(b.fisher_needed) == 0 and int(b.fisher_batches) == 2  # 64 + 36 samples
    assert all(f.abs().sum() > 0 for f in b.fisher().values())


def test_nothing_selected_means_no_backward(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "eta", e_margin=1e-6)
    h = snapshot(a)
    a(x[:BS])
    assert a.counters()["backward_images"] == 0
    assert not changed_keys(h, snapshot(a)) & bn_affine_keys(a.model)
