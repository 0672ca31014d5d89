"""auto (testtime's own recipe): neighbourhood normalisation, weighted SLR, source ensembling."""

from __future__ import annotations

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot, state_hash
from testtime.adapt import adapt
from testtime.adapt.components.consistency import prior_correction
from testtime.adapt.components.norm_local import NeighbourStatsNorm
from testtime.errors import ConfigError, DataError, ModelError

BS = 16
OPTIONS = {
    "neighbours": 6,
    "prior_n": 4.0,
    "source_weight": 0.0,
    "instance_alpha": 4.0,
}  # every optional part on


def _bn(c: int = 3) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, c))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, c))
        bn.weight.copy_(torch.linspace(0.5, 1.5, c))
        bn.bias.copy_(torch.linspace(-0.1, 0.1, c))
    return bn


def test_source_weight_zero_without_correction_is_bn_adapt(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    a = adapt(source_model, "auto", loss="none", source_weight=0.0, prior_correction=False)
    torch.testing.assert_close(a(x), adapt(source_model, "bn")(x), rtol=1e-4, atol=1e-4)


def test_whole_batch_neighbourhood_equals_batch_norm():
    bn = _bn()
    x = torch.randn(10, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    ref = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    for k in (0, 10, 50):  # 0 and anything >= the batch mean the whole batch
        torch.testing.assert_close(NeighbourStatsNorm(bn, neighbours=k)(x), ref, rtol=1e-5, atol=1e-5)


def test_neighbours_come_from_the_same_domain_and_prior_blends_with_source():
    bn = _bn()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 3, 4, 4, generator=g)  # domain A: mean 0, std 1
    b = torch.randn(6, 3, 4, 4, generator=g) * 3 + 5  # domain B: far away
    x = torch.cat([a, b])
    out = NeighbourStatsNorm(bn, neighbours=6)(x)
    for part, data in ((out[:6], a), (out[6:], b)):  # each half normalised by its own statistics
        var, mean = torch.var_mean(data, dim=(0, 2, 3), correction=0)
        ref = torch.nn.functional.batch_norm(data, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-5)
    prior = NeighbourStatsNorm(bn, neighbours=6, prior_n=2.0)(x)  # a = 2 / (2 + 6) = 0.25 source weight
    var, mean = torch.var_mean(a, dim=(0, 2, 3), correction=0)
    m = 0.25 * bn.running_mean + 0.75 * mean
    v = 0.25 * bn.running_var + 0.75 * var
    ref = torch.nn.functional.batch_norm(a, m, v, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(prior[:6], ref, rtol=1e-5, atol=1e-5)


def test_fixed_source_weight_ignores_batch_size():
    bn = _bn()
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(3)) + 2
    out = NeighbourStatsNorm(bn, source_weight=0.75)(x)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    m, v = 0.75 * bn.running_mean + 0.25 * mean, 0.75 * bn.running_var + 0.25 * var
    ref = torch.nn.functional.batch_norm(x, m, v, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="not both"):
        NeighbourStatsNorm(bn, source_weight=0.5, prior_n=4)


def test_instance_aware_correction_only_moves_outlying_samples():
    bn = _bn()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, 8, 8, generator=g)
    x[0] = x[0] * 4 + 6  # one sample of another "domain"
    alpha = 3.0
    out = NeighbourStatsNorm(bn, instance_alpha=alpha)(x)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    inst_var, inst_mean = torch.var_mean(x, dim=(2, 3), correction=0)
    dm, dv = inst_mean - mean, inst_var - var
    tm, tv = alpha * (var / 64).sqrt(), alpha * (2 * var**2 / 63).sqrt()
    m = mean + torch.sign(dm) * (dm.abs() - tm).clamp_min(0)
    v = var + torch.sign(dv) * (dv.abs() - tv).clamp_min(0)
    ref = (x - m[:, :, None, None]) / (v[:, :, None, None] + bn.eps).sqrt() * bn.weight[
        :, None, None
    ] + bn.bias[:, None, None]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (dm[0].abs() > tm).all()  # the outlier is corrected towards its own statistics ...
    plain = NeighbourStatsNorm(bn)(x)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)


@pytest.mark.parametrize("a", [0.0, 0.4, 2 / 3])
def test_blended_batch_norm_backward_matches_autograd(a):
    from testtime.adapt.components.norm_local import _BlendedBatchNorm

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    ms, vs = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: _BlendedBatchNorm.apply(x, w, b, ms, vs, a, 1e-5)[0], (x, w, b)
    )


def test_gradient_flows_through_neighbour_statistics():
    bn = _bn()
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    NeighbourStatsNorm(bn, neighbours=3, prior_n=1.0)(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and bn.weight.grad is not None


def test_bad_config_values():
    for bad in (
        {"neighbours": -1},
        {"prior_n": -1.0},
        {"source_weight": 1.5},
        {"loss": "mse"},
        {"momentum_src": 1.5},
        {"temperature": 0},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adapt(torch.nn.Linear(2, 2), "auto", **bad)


def test_one_update_trains_affines_ensembles_and_keeps_one_backward(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    a = adapt(source_model, "auto", momentum_src=0.9)
    frozen = adapt(source_model, "auto", loss="none")  # the same first forward, no update
    source = [p.detach().clone() for p in a.params]
    stepped: list[list[torch.Tensor]] = []
    a.optimizer.register_step_post_hook(lambda *_: stepped.append([p.detach().clone() for p in a.params]))
    s0 = snapshot(a)
    out = a(x)
    torch.testing.assert_close(out, frozen(x), rtol=0, atol=1e-5)
    for p, s, src in zip(a.params, stepped[0], source, strict=True):
        torch.testing.assert_close(p.detach(), 0.9 * s + 0.1 * src, rtol=1e-6, atol=1e-7)
    changed = changed_keys(s0, snapshot(a)) - BOOKKEEPING
    assert changed - bn_affine_keys(a.model) == {"class_probs_ema"}
    c = a.counters()
    assert c["forward_images"] == BS and c["backward_images"] == BS  # at most one backward per batch


def test_norm_only_and_prior_correction_switches(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    frozen = adapt(source_model, "auto", loss="none", prior_correction=False)
    s0 = snapshot(frozen)
    out = frozen(x)
    changed = {k for k in changed_keys(s0, snapshot(frozen)) - BOOKKEEPING if not k.startswith("guard.")}
    assert not changed and frozen.counters()["backward_images"] == 0  # only the collapse guard's records
    corrected = adapt(source_model, "auto", loss="none", prior_correction=True)
    torch.testing.assert_close(corrected(x), prior_correction(out), rtol=1e-5, atol=1e-5)


def test_reset_restores_bit_for_bit(source_model, noisy_stream):
    x = noisy_stream[0]  # (the defaults are covered by tests/test_all_methods.py)
    a = adapt(source_model, "auto", **OPTIONS)
    h0 = state_hash(a)
    first = a(x[:BS])
    for i in range(BS, 3 * BS, BS):
        a(x[i : i + BS])
    assert state_hash(a) != h0
    a.reset()
    assert state_hash(a) == h0
    torch.testing.assert_close(a(x[:BS]), first, rtol=0, atol=0)


def test_save_and_load_state_continue_identically(source_model, noisy_stream, tmp_path):
    x = noisy_stream[0]
    a = adapt(source_model, "auto", **OPTIONS)
    a(x[:BS])
    a.save_state(tmp_path / "auto.pt")
    b = adapt(source_model, "auto", **OPTIONS)
    b.load_state(tmp_path / "auto.pt")
    assert state_hash(b) == state_hash(a)
    for i in range(BS, 3 * BS, BS):
        torch.testing.assert_close(b(x[i : i + BS]), a(x[i : i + BS]), rtol=0, atol=0)
    assert state_hash(b) == state_hash(a)


def test_bf16_runs_with_float32_state(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    a = adapt(source_model, "auto", amp="bf16!", **OPTIONS)
    out = a(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in a.params) and a.counters()["backward_images"] == BS


@pytest.mark.parametrize("options", [{}, OPTIONS])
def test_batch_of_one_predicts_without_update(source_model, noisy_stream, options):
    x = noisy_stream[0]
    a = adapt(source_model, "auto", **options)
    s0 = snapshot(a)
    out = a(x[:1])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert a.counters()["backward_images"] == 0
    assert not changed_keys(s0, snapshot(a)) & bn_affine_keys(a.model)


def test_bad_input_refused_and_state_unchanged(source_model, noisy_stream):
    a = adapt(source_model, "auto", **OPTIONS)
    a(noisy_stream[0][:BS])
    h, counters = state_hash(a), a.counters()
    for bad in (
        torch.rand(4, 3, 32, 32) * 255,
        torch.full((4, 3, 32, 32), float("nan")),
        torch.rand(4, 1, 32, 32),
    ):
        with pytest.raises(DataError, match="auto"):
            a(bad)
    assert state_hash(a) == h and a.counters() == counters


def test_adapts_and_beats_source(source_model, noisy_stream):
    x, y = noisy_stream[0][:256], noisy_stream[1][:256]
    a, src = adapt(source_model, "auto"), adapt(source_model, "source")
    err = 100 * float(
        (torch.cat([a(x[i : i + 64]) for i in range(0, 256, 64)]).argmax(1) != y).float().mean()
    )
    src_err = 100 * float((src(x).argmax(1) != y).float().mean())
    assert err < src_err - 5, (src_err, err)


def test_running_test_statistics_average_batches_and_anchor_to_source():
    bn = _bn()
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(8, 3, 4, 4, generator=g) + 3.0
    x2 = torch.randn(8, 3, 4, 4, generator=g) - 3.0
    a, m = 2 / 3, 0.25
    norm = NeighbourStatsNorm(bn, source_weight=a, test_momentum=m)
    torch.testing.assert_close(norm.test_mean, bn.running_mean)  # starts at the source statistics
    out1 = norm(x1)
    var1, mean1 = torch.var_mean(x1, dim=(0, 2, 3), correction=0)
    mean_t = (1 - m) * bn.running_mean + m * mean1
    var_t = (1 - m) * bn.running_var + m * var1
    torch.testing.assert_close(norm.test_mean, mean_t)
    torch.testing.assert_close(norm.test_var, var_t)
    ref = torch.nn.functional.batch_norm(
        x1, a * bn.running_mean + (1 - a) * mean_t, a * bn.running_var + (1 - a) * var_t, bn.weight, bn.bias,
        False, 0.0, bn.eps,
    )  # fmt: skip
    torch.testing.assert_close(out1, ref, rtol=1e-5, atol=1e-5)
    norm(x2)  # the second batch moves the running statistics only by m
    var2, mean2 = torch.var_mean(x2, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(norm.test_mean, (1 - m) * mean_t + m * mean2)
    torch.testing.assert_close(norm.test_var, (1 - m) * var_t + m * var2)
    assert torch.equal(norm.running_mean, bn.running_mean), "the source statistics stay as they are"
    # momentum 1 is the current batch only: the fixed blend of before
    torch.testing.assert_close(
        NeighbourStatsNorm(bn, source_weight=a, test_momentum=1.0)(x2),
        NeighbourStatsNorm(bn, source_weight=a)(x2),
    )


def test_running_test_statistics_train_through_the_batch_and_reset(source_model, noisy_stream):
    x = noisy_stream[0]
    a = adapt(source_model, "auto", test_momentum=0.1)
    h0 = state_hash(a)
    first = a(x[:BS])
    a(x[BS : 2 * BS])
    assert state_hash(a) != h0
    assert a.counters()["backward_images"] == 2 * BS
    a.reset()
    assert state_hash(a) == h0
    torch.testing.assert_close(a(x[:BS]), first, rtol=0, atol=0)
    for bad in ({"test_momentum": 0.0}, {"test_momentum": 1.5}, {"test_momentum": 0.5, "neighbours": 4}):
        with pytest.raises(ConfigError, match="test_momentum"):
            adapt(source_model, "auto", **bad)
