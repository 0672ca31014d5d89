"""PETAL (FIM restore): CoTTA's mean teacher + Gaussian source prior + Fisher-based restoration."""

from __future__ import annotations

import pytest
import torch

from testtime.adapt import adapt
from testtime.adapt.methods.petal import fisher_restore_masks
from testtime.errors import ConfigError
from testtime.metrics import MetricAccumulator

N, BS = 128, 32
B1 = 16  # single-batch checks


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_fisher_masks_use_the_interpolated_global_quantile():
    grads = [torch.tensor([0.1, -0.2, 0.3]), torch.tensor([[0.0, 0.4], [-0.5, 0.6]])]
    # squared: 0.01 0.04 0.09 | 0 0.16 0.25 0.36 -> sorted 0 .01 .04 .09 .16 .25 .36
    m = fisher_restore_masks(grads, 0.5)  # median 0.09, strictly below is restored
    assert m[0].tolist() == [True, True, False] and m[1].tolist() == [[True, False], [False, False]]
    m = fisher_restore_masks(grads, 1 / 12)  # position 0.5: halfway between 0 and 0.01 (linear)
    assert m[0].tolist() == [False, False, False] and m[1].tolist() == [[True, False], [False, False]]
    assert not any(bool(x.any()) for x in fisher_restore_masks(grads, 0.0))  # nothing below the minimum
    assert int(sum(x.sum() for x in fisher_restore_masks(grads, 1.0))) == 6  # all but the maximum


def test_bad_config_values():
    for bad in ({"prior_var": 0.0}, {"fim_quantile": 1.5}, {"prior_weight": -1.0}, {"n_augment": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adapt(torch.nn.Linear(2, 2), "petal", **bad)


def test_gaussian_prior_is_centred_on_the_source(source_model):
    a = adapt(source_model, "petal", prior_var=0.01)
    assert float(a.prior(a.named_trainable).detach()) == 0.0
    w = next(iter(a.named_trainable.values()))
    with torch.no_grad():
        w.add_(0.1)
    expected = 0.5 * 0.1**2 * w.numel() / (0.01 + 1e-6)
    assert float(a.prior(a.named_trainable).detach()) == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def stream(noisy_stream):
    x, y = noisy_stream
    return x[:N], y[:N]


def test_low_fisher_elements_are_restored_after_the_ema_step(source_model, stream):
    x, _ = stream
    q, m = 0.3, 0.999
    a = adapt(source_model, "petal", anchor_threshold=0.0, fim_quantile=q)
    source = _params(a.anchor)
    grads: list[dict[str, torch.Tensor]] = []
    stepped: list[dict[str, torch.Tensor]] = []
    a.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.detach().clone() for n, p in a.model.named_parameters()})
    )
    a.optimizer.register_step_post_hook(lambda *_: stepped.append(_params(a.model)))
    a(x[:B1])
    assert len(grads) == len(stepped) == 1
    flat = torch.cat([g.pow(2).flatten() for g in grads[0].values()])
    threshold = torch.quantile(flat, q)
    restored = total = 0
    for n, p in a.model.named_parameters():
        mask = grads[0][n].pow(2) < threshold
        assert torch.equal(p.detach(), torch.where(mask, source[n], stepped[0][n])), n
        restored += int(mask.sum())
        total += mask.numel()
        # the teacher averages the student after its optimiser step, before the restoration
        t = dict(a.teacher.named_parameters())[n].detach()
        torch.testing.assert_close(t, m * source[n] + (1 - m) * stepped[0][n], rtol=1e-6, atol=1e-7)
    assert abs(restored / total - q) < 0.01
    assert all(torch.equal(p.detach(), source[n]) for n, p in a.anchor.named_parameters())


def test_prior_pulls_the_student_towards_the_source(source_model, stream):
    x, _ = stream
    drift = {}
    for spw in (0.0, 1.0):
        a = adapt(source_model, "petal", anchor_threshold=0.0, fim_quantile=0.0, prior_weight=spw)
        source = _params(a.anchor)
        for i in range(3):
            a(x[i * B1 : (i + 1) * B1])
        drift[spw] = sum(float((p.detach() - source[n]).pow(2).sum()) for n, p in a.model.named_parameters())
    assert drift[1.0] < 0.5 * drift[0.0], drift


def test_adapts_improves_nll_and_brier_and_resets(source_model, stream):
    x, y = stream
    a = adapt(source_model, "petal", n_augment=4)
    src = adapt(source_model, "source")
    acc, acc_src = MetricAccumulator(), MetricAccumulator()
    for i in range(0, N, BS):
        acc.update(a(x[i : i + BS]), y[i : i + BS])
        acc_src.update(src(x[i : i + BS]), y[i : i + BS])
    s, s0 = acc.summary(), acc_src.summary()
    assert s["error"] < s0["error"] - 5 and s["nll"] < s0["nll"] and s["brier"] < s0["brier"], (s, s0)
    source = _params(a.anchor)
    a.reset()
    for net in (a.model, a.teacher):
        assert all(torch.equal(p.detach(), source[n]) for n, p in net.named_parameters())
    assert a._restore_masks is None
