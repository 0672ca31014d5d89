"""auto (testtime's own recipe): neighbourhood normalisation, weighted SLR, source ensembling."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot, state_hash, tiny_gn, tiny_ln
from testtime.adapt import adapt
from testtime.adapt.components.consistency import prior_correction
from testtime.adapt.components.norm_local import NeighbourStatsNorm
from testtime.errors import ConfigError, DataError, ModelError

BS = 16
STAT_BUFFERS = {"test_mean", "test_var", "last_mean", "last_var", "restarted_at", "class_mean", "class_sq"}
BATCH_ONLY = {
    "test_momentum": 1.0,
    "shift_threshold": 0.0,
    "label_threshold": 0.0,
    "class_balanced": False,
}  # round-2 statistics
OPTIONS = {
    **BATCH_ONLY,
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
    a = adapt(source_model, "auto", loss="none", source_weight=0.0, prior_correction=False, **BATCH_ONLY)
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
    a = adapt(source_model, "auto", momentum_src=0.9, update_when_label_shifted=True)
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
    statistics = {
        k for k in changed if k.startswith("shift_detector.") or k.rsplit(".", 1)[-1] in STAT_BUFFERS
    }
    assert statistics, "the running test statistics and the detector move with every batch"
    assert changed - bn_affine_keys(a.model) - statistics == {"class_probs_ema"}
    c = a.counters()
    assert c["forward_images"] == BS and c["backward_images"] == BS  # at most one backward per batch


def test_norm_only_and_prior_correction_switches(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    frozen = adapt(source_model, "auto", loss="none", prior_correction=False)
    s0 = snapshot(frozen)
    out = frozen(x)
    changed = {
        k
        for k in changed_keys(s0, snapshot(frozen)) - BOOKKEEPING
        if not k.startswith(("guard.", "shift_detector.")) and k.rsplit(".", 1)[-1] not in STAT_BUFFERS
    }
    # only the collapse guard's records and the normalisation statistics move: no parameter
    assert not changed and frozen.counters()["backward_images"] == 0
    corrected = adapt(source_model, "auto", loss="none", prior_correction=True, prior_rescale=False)
    torch.testing.assert_close(corrected(x), prior_correction(out), rtol=1e-5, atol=1e-5)
    rescaled = adapt(source_model, "auto", loss="none", prior_correction=True, prior_rescale=True)
    y = rescaled(x)  # the same predictions, logits C times ROID's
    torch.testing.assert_close(y, prior_correction(out) * out.shape[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(y.argmax(1), prior_correction(out).argmax(1))


def test_rescaled_prior_correction_keeps_logits_for_an_even_prior():
    logits = torch.randn(20, 10)
    even = torch.cat([logits, logits.roll(1, 1), logits.roll(2, 1), logits.roll(3, 1), logits.roll(4, 1)])
    even = torch.cat([even, even.roll(5, 1)])  # every class in every position: batch-mean softmax uniform
    torch.testing.assert_close(prior_correction(even, rescale=True), even, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prior_correction(even), even / 10, rtol=1e-5, atol=1e-5)


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
    a = adapt(source_model, "auto", test_momentum=0.1, shift_threshold=0.0, label_threshold=0.0)
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


# ---- shift-aware running statistics (components.shift) ----

SHIFT = {"test_momentum": 0.05, "shift_threshold": 0.1, "label_threshold": 0.0, "source_weight": 2 / 3}


def _three_layers(threshold: float = 0.5, label_threshold: float = 0.5):
    from testtime.adapt.components.shift import attach_shift_detector

    layers = [NeighbourStatsNorm(_bn(), source_weight=0.5, test_momentum=0.1) for _ in range(3)]
    det = attach_shift_detector(torch.nn.Sequential(*layers), threshold, label_threshold)
    return layers, det


def _moments(x):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


def test_symmetric_kl_is_zero_for_equal_and_grows_with_distance():
    from testtime.adapt.components.shift import symmetric_kl

    m, v = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    assert float(symmetric_kl(m, v, m, v, 0.0)) == 0.0
    near = float(symmetric_kl(m + 0.1, v, m, v, 0.0))
    far = float(symmetric_kl(m + 1.0, v * 3, m, v, 0.0))
    assert 0 < near < far
    # one channel, unit variances, means 1 apart: KL = 1/2 each way, so the symmetric mean is 1/2
    assert float(
        symmetric_kl(torch.ones(1), torch.ones(1), torch.zeros(1), torch.ones(1), 0.0)
    ) == pytest.approx(0.5)


def test_detector_decides_domain_change_label_shift_or_neither_from_its_layer_groups():
    from testtime.adapt.components.shift import ShiftDetector

    det = ShiftDetector(threshold=0.1, label_threshold=0.04, n_layers=6)  # 0.01 per batch of 4
    assert det.n_group == 2  # first two layers: domain; last two: labels; the middle two: neither
    same = (torch.zeros(4), torch.ones(4))
    far = (torch.full((4,), 3.0), torch.ones(4))

    def batch(shallow, middle, deep):
        det.begin_batch(4)
        for i, (mean_b, var_b) in enumerate([shallow] * 2 + [middle] * 2 + [deep] * 2):
            det.report(i, mean_b, var_b, *same, 0.0)

    batch(far, same, same)  # the stream's first batch, far from the source: a new domain
    assert not bool(det.slow) and int(det.shifts) == 1 and int(det.reset_to) == 1
    batch(same, far, same)  # only the middle layers moved: nothing
    assert not bool(det.slow) and int(det.shifts) == 1 and int(det.reset_to) == 1
    batch(same, same, far)  # the deep layers alone: label shift, the next batch runs slow
    assert bool(det.slow) and int(det.label_batches) == 1 and int(det.shifts) == 1
    assert det.last_scores[1] > det.label_threshold / 4
    batch(far, same, far)  # a new domain while label-shifted: no restart, still slow
    assert bool(det.slow) and int(det.shifts) == 1 and int(det.reset_to) == 1
    batch(same, same, same)  # back to normal: batch statistics
    assert not bool(det.slow)
    batch(far, same, far)  # the shallow layers moved: a new domain, restart, batch statistics
    assert not bool(det.slow) and int(det.shifts) == 2 and int(det.reset_to) == 6
    assert det.restart_due(0) is False, "a restart applies from the next batch"
    det.begin_batch(4)
    assert det.restart_due(0) and det.restart_due(5) and not det.restart_due(6)
    # the same deep divergence is label shift for a large batch, sampling noise for a small one
    det.slow.fill_(False)
    deep_only = (torch.full((4,), 0.2), torch.ones(4))  # symmetric KL 0.02 against `same`
    for n, expect in ((400, True), (1, False)):
        det.begin_batch(n)
        for i, (mean_b, var_b) in enumerate([same] * 4 + [deep_only] * 2):
            det.report(i, mean_b, var_b, *same, 0.0)
        assert bool(det.slow) is expect, n
    for bad in ((-1.0, 0.1), (0.1, float("nan"))):
        with pytest.raises(ModelError, match="threshold"):
            ShiftDetector(*bad, n_layers=3)
    with pytest.raises(ModelError, match="layer"):
        ShiftDetector(0.1, 0.1, n_layers=0)


def test_split_half_divergence_is_scale_free_and_zero_for_equal_halves():
    from testtime.adapt.components.shift import split_half_divergence

    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    assert float(split_half_divergence(x.repeat_interleave(2, 0), 0.0)) == pytest.approx(0.0, abs=1e-6)
    d = float(split_half_divergence(x, 0.0))
    assert d > 0
    # per-channel KL does not change when a channel is rescaled or shifted: the layer's own units
    scaled = x * torch.tensor([10.0, 0.1, 3.0]).view(1, 3, 1, 1) + 5.0
    assert float(split_half_divergence(scaled, 0.0)) == pytest.approx(d, rel=1e-3)
    flat = torch.randn(16, 5)  # BatchNorm1d inputs (N, C)
    assert float(split_half_divergence(flat, 0.0)) > 0


def _heavy_tailed_features(n, classes, generator):
    """(n, 32) features of a class-clustered, heavy-tailed kind (like a digit network's last
    BatchNorm1d input): i.i.d. batches of them diverge from the population by much more than 1/n."""
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(1)) * 2  # fixed classes
    y = classes[torch.randint(len(classes), (n,), generator=generator)]
    noise = torch.distributions.StudentT(4.0).sample((n, 32))
    return centres[y] + noise


def test_split_half_label_test_transfers_where_the_per_sample_threshold_does_not():
    from testtime.adapt.components.shift import ShiftDetector

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    population = _heavy_tailed_features(100_000, torch.arange(10), g)
    mean, var = population.mean(0), population.var(0, unbiased=False)
    flagged = {}
    for noise in ("per_sample", "split_half"):
        det = ShiftDetector(threshold=0.0, label_threshold=1.0, n_layers=1, label_noise=noise)
        flags = []
        for classes in [torch.arange(10)] * 20 + [torch.tensor([3])] * 5:  # i.i.d., then one class
            x = _heavy_tailed_features(200, classes, g)
            det.begin_batch(200)
            assert det.wants_input(0) is (noise == "split_half")
            det.report(0, x.mean(0), x.var(0, unbiased=False), mean, var, 1e-5, x)
            flags.append(bool(det.slow))
            assert math.isnan(float(det.last_scores[2])) is (noise == "per_sample")
        flagged[noise] = (sum(flags[:20]), sum(flags[20:]))
    assert flagged["split_half"] == (0, 5), flagged  # i.i.d. batches pass; one-class batches are caught
    assert flagged["per_sample"][0] >= 10, flagged  # the same threshold per sample flags i.i.d. batches
    # too few samples to split: never judged label-shifted that way
    det = ShiftDetector(threshold=0.0, label_threshold=1.0, n_layers=1, label_noise="split_half")
    x = _heavy_tailed_features(3, torch.tensor([3]), g)
    det.begin_batch(3)
    assert not det.wants_input(0)
    det.report(0, x.mean(0), x.var(0, unbiased=False), mean, var, 1e-5, None)
    assert not bool(det.slow)
    with pytest.raises(ModelError, match="label_noise"):
        ShiftDetector(0.1, 0.1, n_layers=1, label_noise="per_batch")


def test_fast_batches_equal_the_fixed_blend_and_a_new_domain_restarts_every_layer():
    layers, det = _three_layers(label_threshold=0.0)  # never label-shifted: always fast
    assert det.n_group == 1
    plain = [NeighbourStatsNorm(_bn(), source_weight=0.5) for _ in range(3)]
    g = torch.Generator().manual_seed(0)

    def run(mods, x):
        for layer in mods:
            x = layer(x)
        return x

    x = torch.randn(16, 3, 4, 4, generator=g)
    # not slow: exactly the fixed source blend of the batch (round-2 normalisation)
    torch.testing.assert_close(run(layers, x), run(plain, x), rtol=1e-5, atol=1e-5)
    # the running statistics still move at the slow momentum from the source's
    torch.testing.assert_close(layers[0].test_mean, layers[0].running_mean.lerp(_moments(x)[0], 0.1))
    shifted = torch.randn(16, 3, 4, 4, generator=g) * 4 + 5  # a new "domain"
    before = int(det.shifts)
    run(layers, shifted)
    assert int(det.shifts) == before + 1 and int(det.reset_to) == 2 and not bool(det.slow)
    after = torch.randn(16, 3, 4, 4, generator=g) * 4 + 5
    run(layers, after)
    # every layer restarted from its moments of the triggering batch, then moved towards the next
    assert [int(layer.restarted_at) for layer in layers] == [2, 2, 2]
    torch.testing.assert_close(layers[0].test_mean, _moments(shifted)[0].lerp(_moments(after)[0], 0.1))


def test_slow_batches_normalise_with_the_running_statistics():
    layers, det = _three_layers()
    det.slow.fill_(True)
    layer = layers[0]
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2)) + 2
    reference = NeighbourStatsNorm(_bn(), source_weight=0.5, test_momentum=0.1)  # no detector: always running
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)


def test_shift_detection_needs_running_statistics_and_refuses_bad_values(source_model):
    from testtime.adapt.components.shift import ShiftDetector

    assert adapt(source_model, "auto", **BATCH_ONLY).shift_detector is None
    assert adapt(source_model, "auto").shift_detector is not None  # on by default
    for key in ("shift_threshold", "label_threshold"):
        with pytest.raises(ConfigError, match=key):
            adapt(source_model, "auto", **{**BATCH_ONLY, key: 0.1})  # test_momentum 1: nothing to switch to
        for bad in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=key):
                adapt(source_model, "auto", test_momentum=0.1, **{key: bad})
    with pytest.raises(ModelError, match="test_momentum"):
        NeighbourStatsNorm(_bn()).attach_detector(ShiftDetector(0.1, 0.1, 1), 0)


def test_shift_aware_auto_resets_saves_and_counts(source_model, noisy_stream, tmp_path):
    x = noisy_stream[0]
    a = adapt(source_model, "auto", **SHIFT)
    det = a.shift_detector
    assert det is not None and det.n_group >= 1
    h0 = state_hash(a)
    first = a(x[:BS])
    a(x[BS : 2 * BS])
    a(x[2 * BS : 3 * BS] * 0.1)  # a dark batch: a change of domain
    assert a.counters()["shifts"] >= 1 and int(det.batch) == 3
    a.save_state(tmp_path / "auto.pt")
    b = adapt(source_model, "auto", **SHIFT)
    b.load_state(tmp_path / "auto.pt")
    assert state_hash(b) == state_hash(a)
    torch.testing.assert_close(b(x[3 * BS : 4 * BS]), a(x[3 * BS : 4 * BS]), rtol=0, atol=0)
    shifts = a.counters()["shifts"]
    a.reset()
    assert state_hash(a) == h0 and int(a.shift_detector.batch) == 0
    assert a.counters()["shifts"] == shifts  # the tallies count on across resets and guard restores
    torch.testing.assert_close(a(x[:BS]), first, rtol=0, atol=0)
    one = a(x[:1])  # a batch of one still predicts (instance statistics blended with the source)
    assert one.shape == (1, first.shape[1]) and torch.isfinite(one).all()


def test_batchnorm1d_inputs_take_the_same_statistics():
    """(N, C) inputs (BatchNorm1d after a linear layer) use the same per-channel statistics over the
    batch, in every path (whole batch, running statistics, neighbourhoods)."""
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 3))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, 3))
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(4)) * 2 + 1
    ref = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    torch.testing.assert_close(NeighbourStatsNorm(bn)(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(NeighbourStatsNorm(bn, neighbours=12)(x), ref, rtol=1e-5, atol=1e-5)
    as_2d = NeighbourStatsNorm(_bn_like(bn), neighbours=4)(x[:, :, None, None])[:, :, 0, 0]
    torch.testing.assert_close(NeighbourStatsNorm(bn, neighbours=4)(x), as_2d, rtol=1e-5, atol=1e-5)
    run = NeighbourStatsNorm(bn, source_weight=0.5, test_momentum=0.1)
    out = run(x)
    var, mean = torch.var_mean(x, dim=0, correction=0)
    ref = torch.nn.functional.batch_norm(
        x,
        0.5 * bn.running_mean + 0.5 * (0.9 * bn.running_mean + 0.1 * mean),
        0.5 * bn.running_var + 0.5 * (0.9 * bn.running_var + 0.1 * var),
        bn.weight,
        bn.bias,
        False,
        0.0,
        bn.eps,
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run.test_mean, 0.9 * bn.running_mean + 0.1 * mean)
    with pytest.raises(ModelError, match=r"needs inputs \(N, C, ...\)"):
        NeighbourStatsNorm(bn)(torch.randn(3))


def _bn_like(bn1d: torch.nn.BatchNorm1d) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(bn1d.num_features)
    bn.load_state_dict(bn1d.state_dict())
    return bn


def test_adapts_a_model_with_batchnorm1d():
    """The default recipe runs on the digits model (BatchNorm1d after its feature layer), adapts,
    and resets exactly."""
    from testtime.models.zoo import load_model

    model = load_model("mnist_digitnet")
    a = adapt(model)
    assert a.name == "auto"
    h = state_hash(a)
    x = torch.rand(BS, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = a(x)
    assert out.shape == (BS, 10) and torch.isfinite(out).all()
    assert a.counters()["batches"] == 1 and state_hash(a) != h
    a.reset()
    assert state_hash(a) == h


def test_class_balanced_statistics_follow_each_class_at_its_share():
    """commit: each class's moments move at test_momentum * K * n_k / n towards its samples'; the
    test statistics are the classes' equal-weight mixture."""
    bn = _bn(2)
    layer = NeighbourStatsNorm(bn, source_weight=0.5, test_momentum=0.1, class_balanced=4)
    x = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(6)) + 1
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])  # 6 of class 0, 2 of class 1, none of 2 and 3
    layer(x)
    torch.testing.assert_close(layer.test_mean, bn.running_mean)  # nothing moves before the commit
    layer.commit(labels)
    src_mean, src_sq = bn.running_mean, bn.running_var + bn.running_mean**2
    ps_mean, ps_sq = x.mean((2, 3)), (x * x).mean((2, 3))
    exp_mean, exp_sq = src_mean.repeat(4, 1), src_sq.repeat(4, 1)
    for k, idx, rate in ((0, slice(0, 6), 0.1 * 4 * 6 / 8), (1, slice(6, 8), 0.1 * 4 * 2 / 8)):
        exp_mean[k] += rate * (ps_mean[idx].mean(0) - src_mean)
        exp_sq[k] += rate * (ps_sq[idx].mean(0) - src_sq)
    torch.testing.assert_close(layer.class_mean, exp_mean)
    torch.testing.assert_close(layer.class_sq, exp_sq)
    torch.testing.assert_close(layer.test_mean, exp_mean.mean(0))
    torch.testing.assert_close(layer.test_var, exp_sq.mean(0) - exp_mean.mean(0) ** 2)
    before = layer.class_mean.clone()
    layer.commit(labels)  # nothing pending: no change
    torch.testing.assert_close(layer.class_mean, before)
    with pytest.raises(ModelError, match="class_balanced"):
        NeighbourStatsNorm(bn, class_balanced=4)  # needs running statistics
    layer(x)
    with pytest.raises(DataError, match="one label per sample"):
        layer.commit(labels[:3])
    torch.testing.assert_close(layer.class_mean, before)  # refused: nothing moved ...
    layer.commit(labels)  # ... and the batch can still be committed
    assert not torch.equal(layer.class_mean, before)


def test_class_balanced_statistics_resist_a_long_run_of_one_class():
    """A long run of one (shifted) class moves the plain running average all the way, the
    class-balanced mixture only by that class's share (1/K)."""
    bn = _bn(3)
    plain = NeighbourStatsNorm(bn, source_weight=0.5, test_momentum=0.1)
    balanced = NeighbourStatsNorm(bn, source_weight=0.5, test_momentum=0.1, class_balanced=5)
    g = torch.Generator().manual_seed(7)
    for _ in range(60):
        x = torch.randn(16, 3, 2, 2, generator=g) * 0.1 + 4.0  # one class, far from the source
        plain(x)
        balanced(x)
        balanced.commit(torch.full((16,), 2))
    shift = 4.0 - bn.running_mean
    torch.testing.assert_close(plain.test_mean, bn.running_mean + shift, atol=0.02, rtol=0)
    torch.testing.assert_close(balanced.test_mean, bn.running_mean + shift / 5, atol=0.02, rtol=0)


def test_class_balanced_recipe_resets_and_checks():
    from testtime.models.zoo import load_model

    with pytest.raises(ConfigError, match="class_balanced"):
        adapt(load_model("cifar10_resnet26"), "auto", **{**BATCH_ONLY, "class_balanced": True})
    a = adapt(load_model("cifar10_resnet26"), "auto", class_balanced=True)
    h = state_hash(a)
    a(torch.rand(BS, 3, 32, 32, generator=torch.Generator().manual_seed(8)))
    moved = [n for n, b in a.named_buffers() if n.endswith("class_mean")]
    assert len(moved) > 10 and state_hash(a) != h
    a.reset()
    assert state_hash(a) == h


def test_class_balanced_restart_starts_every_class_from_the_triggering_batch():
    from testtime.adapt.components.shift import attach_shift_detector

    layers = [
        NeighbourStatsNorm(_bn(), source_weight=0.5, test_momentum=0.1, class_balanced=3) for _ in range(3)
    ]
    det = attach_shift_detector(torch.nn.Sequential(*layers), 0.5, 0.0)
    g = torch.Generator().manual_seed(9)

    def run(x):
        for layer in layers:
            x = layer(x)
        for layer in layers:
            layer.commit(torch.zeros(x.shape[0], dtype=torch.long))  # every sample "class 0"
        return x

    run(torch.randn(16, 3, 4, 4, generator=g))
    shifted = torch.randn(16, 3, 4, 4, generator=g) * 4 + 5  # a new domain: shows in this batch ...
    run(shifted)
    assert int(det.shifts) == 1
    first = layers[0]
    mean_s, var_s = _moments(shifted)
    after = torch.randn(16, 3, 4, 4, generator=g) * 4 + 5
    run(after)  # ... and restarts every class from its pooled moments, before this batch's commit
    assert int(first.restarted_at) == 2
    torch.testing.assert_close(first.class_mean[1:], mean_s.expand(2, -1))
    torch.testing.assert_close(first.class_sq[1:], (var_s + mean_s**2).expand(2, -1))
    rate = 0.1 * 3 * 16 / 16  # one class holds the whole batch: momentum * K
    torch.testing.assert_close(first.class_mean[0], mean_s + rate * (after.mean((0, 2, 3)) - mean_s))


def test_no_gradient_step_on_a_label_shifted_batch(source_model, noisy_stream):
    """update_when_label_shifted=False: a batch the detector finds label-shifted updates the
    statistics but not the affine parameters; other batches still train."""
    x = noisy_stream[0][:BS]

    def params(a):
        return [p.detach().clone() for p in a.params]

    always = adapt(source_model, "auto", update_when_label_shifted=False, label_threshold=1e-9)  # every batch
    p0 = params(always)
    always(x)
    assert bool(always.shift_detector.slow)
    assert all(torch.equal(p, q) for p, q in zip(p0, params(always)))
    assert always.counters()["backward_images"] == 0
    never = adapt(source_model, "auto", update_when_label_shifted=False, label_threshold=1e9)  # no batch
    p0 = params(never)
    never(x)
    assert not bool(never.shift_detector.slow) and never.counters()["backward_images"] == BS
    assert any(not torch.equal(p, q) for p, q in zip(p0, params(never)))


def test_prediction_diversity_is_one_for_even_classes_and_zero_for_one():
    from testtime.adapt.components.shift import prediction_diversity

    assert prediction_diversity(torch.arange(10).repeat(20), 10) == pytest.approx(1.0)
    assert prediction_diversity(torch.full((200,), 3), 10) == 0.0
    # normalised by log(min(classes, batch)): 4 distinct of 4 samples is as even as it gets
    assert prediction_diversity(torch.tensor([0, 1, 2, 3]), 10) == pytest.approx(1.0)
    assert 0 < prediction_diversity(torch.tensor([0] * 8 + [1] * 8), 10) < 0.5
    assert prediction_diversity(torch.tensor([5]), 10) == 0.0  # one sample: no spread to measure


def test_label_diversity_withdraws_the_verdict_for_batches_predicted_over_many_classes(
    source_model, noisy_stream
):
    """label_diversity < 1: a batch the statistics call label-shifted still takes its gradient step
    (and the next batch its own statistics) when its predictions spread over many classes."""
    from testtime.adapt.components.shift import ShiftDetector

    det = ShiftDetector(threshold=0.0, label_threshold=1.0, n_layers=1)
    det.slow.fill_(True)
    det.label_batches.fill_(1)
    det.check_predictions(torch.full((200,), 2), 10, 0.5)  # one class: the verdict stands
    assert bool(det.slow) and int(det.label_batches) == 1
    det.check_predictions(torch.arange(10).repeat(20), 10, 1.0)  # 1.0: never withdrawn
    assert bool(det.slow)
    det.check_predictions(torch.arange(10).repeat(20), 10, 0.5)
    assert not bool(det.slow) and int(det.label_batches) == 0
    x = noisy_stream[0][:BS]
    for diversity, steps in ((1.0, 0), (0.0, BS)):  # 0.0: any two predicted classes withdraw it
        a = adapt(source_model, "auto", label_threshold=1e-9, label_diversity=diversity)
        a(x)
        spread = a.counters()["label_shift_batches"] == 0
        assert a.counters()["backward_images"] == (steps if spread else 0)
        assert spread is (diversity == 0.0)
    with pytest.raises(ConfigError, match="label_diversity"):
        adapt(source_model, "auto", label_diversity=1.5)


def test_source_momentum_is_chosen_by_the_norm_layers_unless_given(source_model):
    # round 8: 0.9 on LayerNorm-only models, ROID's 0.99 on BN and GN models; a given value always wins
    assert adapt(tiny_ln(), "auto").momentum_src == 0.9
    assert adapt(tiny_gn(), "auto").momentum_src == 0.99
    assert adapt(source_model, "auto").momentum_src == 0.99
    assert adapt(tiny_ln(), "auto", momentum_src=0.99).momentum_src == 0.99
    assert adapt(source_model, "auto", momentum_src="none").momentum_src == 0.99  # from the CLI
    with pytest.raises(ConfigError, match="momentum_src"):
        adapt(tiny_ln(), "auto", momentum_src=-0.1)


def test_layernorm_model_ensembles_its_update_at_the_chosen_momentum():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    a = adapt(tiny_ln(), "auto", update_when_label_shifted=True)
    source = [p.detach().clone() for p in a.params]
    stepped: list[list[torch.Tensor]] = []
    a.optimizer.register_step_post_hook(lambda *_: stepped.append([p.detach().clone() for p in a.params]))
    s0 = state_hash(a)
    a(x)
    assert stepped, "one gradient step on the LayerNorm affines"
    for p, s, src in zip(a.params, stepped[0], source, strict=True):
        torch.testing.assert_close(p.detach(), 0.9 * s + 0.1 * src, rtol=1e-6, atol=1e-7)
    a.reset()
    assert state_hash(a) == s0
