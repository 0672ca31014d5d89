"""ROID: weighted SLR + consistency, weight ensembling with the source, prior correction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import BOOKKEEPING, bn_affine_keys, changed_keys, snapshot
from testtime.adapt import adapt
from testtime.adapt.components.consistency import SourceWeights, certainty_diversity_weights, prior_correction
from testtime.adapt.components.losses import soft_likelihood_ratio
from testtime.errors import ConfigError

COUNTERS = BOOKKEEPING
BS = 32


def test_weighting_on_constructed_inputs():
    ema = torch.tensor([0.9, 0.1, 0.0])
    logits = torch.tensor(
        [
            [0.0, 8.0, 0.0],  # confident, unlike the running distribution: most diverse and certain
            [8.0, 0.0, 0.0],  # confident, like the running distribution: dropped
            [0.0, 0.0, 0.0],  # uniform: least certain
            [0.0, 1.0, 1.0],
        ]
    )
    w, keep = certainty_diversity_weights(logits, ema, temperature=1 / 3)
    div = 1 - F.cosine_similarity(ema[None], logits.softmax(1), dim=1)
    d = (div - div.min()) / (div.max() - div.min())
    assert keep.tolist() == [True, False, False, True]  # below-mean diversity is dropped
    assert float(w[0]) == pytest.approx(math.exp(3.0))  # div = cert = 1 after min-max: exp(1 * 1 / T)
    assert w[1:3].tolist() == [0.0, 0.0]
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    cert = (ent.max() - ent) / (ent.max() - ent.min())
    assert float(w[3]) == pytest.approx(math.exp(3 * float(d[3] * cert[3])), rel=1e-5)
    assert 1 < float(w[3]) < float(w[0])


def test_prior_correction_and_slr_on_constructed_inputs():
    logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(0))
    uniform = torch.zeros(20, 10)
    torch.testing.assert_close(prior_correction(uniform + 2.0), (uniform + 2.0) / 10)  # uniform prior: 1/C
    p = logits.softmax(1).mean(0)
    s = max(1 / 20, 1 / 10) / float(p.max())
    torch.testing.assert_close(prior_correction(logits), logits * (p + s) / (1 + s * 10))
    probs = logits.softmax(1).clamp(0, 0.99)
    torch.testing.assert_close(
        soft_likelihood_ratio(logits), -(probs * torch.log(probs / (1 - probs) + 1e-5)).sum(1)
    )
    assert torch.isfinite(soft_likelihood_ratio(torch.tensor([[100.0, 0.0]]))).all()  # clipped at 0.99


def test_source_weight_ensembling_formula():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    src = SourceWeights(p)
    with torch.no_grad():
        p[0].copy_(torch.tensor([5.0, -2.0]))
        p[1].fill_(7.0)
    src.ensemble_(p, 0.75)
    torch.testing.assert_close(
        p[0].detach(), 0.75 * torch.tensor([5.0, -2.0]) + 0.25 * torch.tensor([1.0, 2.0])
    )
    torch.testing.assert_close(p[1].detach(), torch.tensor([[6.0]]))
    src.ensemble_(p, 1.0)  # momentum 1: unchanged
    torch.testing.assert_close(p[1].detach(), torch.tensor([[6.0]]))


def test_bad_config_values():
    for bad in ({"temperature": 0.0}, {"slr_clip": 1.0}, {"momentum_src": 1.5}, {"momentum_probs": -0.1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            adapt(torch.nn.Linear(2, 2), "roid", **bad)


def test_one_update_ensembles_with_source_and_corrects_prior(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    ms = 0.9
    a = adapt(source_model, "roid", momentum_src=ms)
    bn = adapt(source_model, "bn")
    bn_logits = bn(x)  # the same first forward: batch statistics, source weights
    source = [p.detach().clone() for p in a.params]
    stepped: list[list[torch.Tensor]] = []
    a.optimizer.register_step_post_hook(lambda *_: stepped.append([p.detach().clone() for p in a.params]))
    s0 = snapshot(a)
    out = a(x)
    torch.testing.assert_close(out, prior_correction(bn_logits), rtol=0, atol=1e-5)
    for p, s, src in zip(a.params, stepped[0], source):
        torch.testing.assert_close(p.detach(), ms * s + (1 - ms) * src, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(s, src) for s, src in zip(stepped[0], source))
    expected_probs = 0.9 * torch.full((10,), 0.1) + 0.1 * bn_logits.softmax(1).mean(0)
    torch.testing.assert_close(a.class_probs_ema, expected_probs)
    changed = changed_keys(s0, snapshot(a)) - COUNTERS
    assert changed - bn_affine_keys(a.model) == {"class_probs_ema"}  # source copy is never changed
    c = a.counters()
    kept = c["forward_images"] - BS  # the consistency view covers the kept samples only
    assert 0 < kept < BS and c["backward_images"] == BS + kept


def test_switches(source_model, noisy_stream):
    x = noisy_stream[0][:BS]
    a = adapt(source_model, "roid", use_prior_correction=False, use_consistency=False, momentum_src=0.0)
    ref = adapt(source_model, "bn")
    source = [p.detach().clone() for p in a.params]
    torch.testing.assert_close(a(x), ref(x), rtol=0, atol=1e-5)  # plain outputs
    assert a.counters()["forward_images"] == BS and a.counters()["backward_images"] == BS  # no augmented view
    assert all(torch.equal(p.detach(), q) for p, q in zip(a.params, source))  # momentum 0: back to the source
    b = adapt(source_model, "roid", use_weighting=False)
    b(x)
    assert b.counters()["forward_images"] == 2 * BS  # every sample kept
    assert torch.equal(b.class_probs_ema, torch.full((10,), 0.1))  # only tracked with weighting


def test_batch_of_one_takes_no_gradient_step(source_model, noisy_stream):
    x = noisy_stream[0]
    a = adapt(source_model, "roid")
    s0 = snapshot(a)
    out = a(x[:1])
    assert torch.isfinite(out).all() and a.counters()["backward_images"] == 0
    assert not changed_keys(s0, snapshot(a)) & bn_affine_keys(a.model)
    assert not torch.equal(a.class_probs_ema, s0["class_probs_ema"])


def test_adapts_and_beats_source(source_model, noisy_stream):
    x, y = noisy_stream[0][:256], noisy_stream[1][:256]
    a, src = adapt(source_model, "roid"), adapt(source_model, "source")
    err = 100 * float(
        (torch.cat([a(x[i : i + 64]) for i in range(0, 256, 64)]).argmax(1) != y).float().mean()
    )
    src_err = 100 * float((src(x).argmax(1) != y).float().mean())
    assert err < src_err - 5, (src_err, err)
