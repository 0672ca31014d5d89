"""SAR: reliable entropy + SAM on norm affine parameters, model recovery."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.sam import SharpnessAware
from testtime.adapt.components.selection import is_top_layer, prepare_norm_adaptation
from testtime.errors import ConfigError, ModelError

COUNTERS = BOOKKEEPING
N, BS = 192, 64


class Contiguous(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def _err(a, x, y, bs=BS):
    out = torch.cat([a(x[i : i + bs]) for i in range(0, len(x), bs)])
    return 100.0 * float((out.argmax(1) != y).float().mean())


def test_sam_ascent_and_exact_restore():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    q = torch.nn.Parameter(torch.tensor([1.0]))  # no gradient: untouched
    p.grad = torch.tensor([3.0, 4.0])
    w = p.detach().clone()
    sam = SharpnessAware([p, q], rho=0.05)
    sam.ascend()
    torch.testing.assert_close(p.detach(), w + 0.05 * torch.tensor([0.6, 0.8]))
    assert q.item() == 1.0
    sam.restore()
    assert torch.equal(p.detach(), w)


def test_top_layer_rules_and_groupnorm_models():
    assert is_top_layer("layer4.0.bn1") and is_top_layer("blocks.10.norm1") and is_top_layer("norm")
    assert not is_top_layer("layer3.3.bn2") and not is_top_layer("blocks.1.norm1")
    net = torch.nn.Sequential()
    net.add_module("layer3", torch.nn.GroupNorm(2, 4))
    net.add_module("layer4", torch.nn.GroupNorm(2, 4))
    chosen = prepare_norm_adaptation(net, skip_top_layers=True)
    assert len(chosen) == 2 and all(p is not net.layer4.weight for p in chosen)
    assert len(prepare_norm_adaptation(net, skip_top_layers=False)) == 4
    with pytest.raises(ModelError, match="GroupNorm"):
        prepare_norm_adaptation(torch.nn.Sequential(torch.nn.Linear(2, 2)), skip_top_layers=True)
    # SAR on a GroupNorm model (its design target): only the GN affine parameters change.
    # (`Contiguous`: torch 2.13 CPU segfaults in GroupNorm backward on channels_last input.)
    torch.manual_seed(0)
    gn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), Contiguous(), torch.nn.GroupNorm(2, 8), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )  # fmt: skip
    a = adapt(gn, "sar", e_margin=1.0, lr=0.1)
    s0 = snapshot(a)
    a(torch.rand(8, 3, 8, 8))
    assert changed_keys(s0, snapshot(a)) - COUNTERS - {"loss_ema"} == {"model.2.weight", "model.2.bias"}
    with pytest.raises(ConfigError, match="rho"):
        adapt(gn, "sar", rho=-1)


@pytest.fixture(scope="module")
def stream(noisy_stream):
    x, y = noisy_stream
    return x[:N], y[:N]


def test_sar_changes_only_bn_affine_and_beats_source(source_model, stream):
    x, y = stream
    a = adapt(source_model, "sar")
    before = snapshot(a)
    err = _err(a, x, y)
    changed = changed_keys(before, snapshot(a)) - COUNTERS
    keys = bn_affine_keys(a.model)
    assert changed & keys and changed - keys == {"loss_ema"}
    assert len(a.params) == len(keys)  # ResNet-26 has no `layer4`: every BN layer adapts
    assert math.isfinite(float(a.loss_ema)) and int(a.n_recoveries) == 0
    c = a.counters()
    assert c["forward_images"] == 2 * N and c["backward_images"] == 2 * N  # SAM: two passes
    src = _err(adapt(source_model, "source"), x, y)
    assert err < src - 5, (src, err)


def test_model_recovery_restores_source(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "sar", reset_constant=100.0)  # any loss average triggers recovery
    s0 = snapshot(a)
    a(x[:32])
    assert int(a.n_recoveries) == 1
    assert not changed_keys(s0, snapshot(a)) & bn_affine_keys(a.model)  # back to the source
    assert all(not st for st in a.optimizer.state.values())
    ema = float(a.loss_ema)
    assert math.isfinite(ema)  # the average survives the recovery (official behaviour)
    a(x[32:64])
    assert int(a.n_recoveries) == 2


def test_empty_selection_takes_no_backward(source_model, stream):
    x, _ = stream
    a = adapt(source_model, "sar", e_margin=1e-6)
    s0 = snapshot(a)
    a(x[:BS])
    assert a.counters()["backward_images"] == 0 and a.counters()["forward_images"] == BS
    assert not changed_keys(s0, snapshot(a)) & bn_affine_keys(a.model)  # zero gradient, no momentum yet
