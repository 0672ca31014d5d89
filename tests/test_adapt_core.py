"""Behaviour of the adaptation wrapper and the Source / BN / Tent recipes."""

from __future__ import annotations

import pytest
import torch

import testtime as tt
from conftest import state_hash
from testtime.adapt import adapt, list_methods
from testtime.adapt.components.norm import AdaptiveNorm, BatchStatsNorm, SourceNorm
from testtime.errors import ConfigError, DataError, ModelError
from testtime.models.zoo import build_model


def error(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) != y).float().mean())


def run(model, x, y, bs=100):
    return torch.cat([model(x[i : i + bs]) for i in range(0, len(x), bs)])


def test_registry_lists_foundation_methods():
    assert list_methods()[:3] == ["source", "bn", "tent"]
    assert tt.adapt is adapt


def test_unknown_method_and_option_fail_clearly():
    m = build_model("resnet20")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        adapt(m, "nope")
    with pytest.raises(ConfigError, match="unknown option"):
        adapt(m, "tent", learning_rate=1.0)
    with pytest.raises(ConfigError, match="lr"):
        adapt(m, "tent", lr=-1)
    with pytest.raises(ConfigError, match="expected a number"):
        adapt(m, "tent", lr="fast")
    with pytest.raises(ConfigError, match=r"adapt\(\) needs a torch\.nn\.Module"):
        adapt("not a model", "tent")


def test_caller_model_is_not_modified(source_model):
    before = state_hash(source_model)
    a = adapt(source_model, "tent")
    a(torch.rand(16, 3, 32, 32))
    assert state_hash(source_model) == before
    assert not any(isinstance(m, AdaptiveNorm) for m in source_model.modules())


def test_source_matches_plain_model(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "source")
    with torch.no_grad():
        ref = source_model.eval()(x[:100])
    torch.testing.assert_close(a(x[:100]), ref, rtol=1e-4, atol=1e-4)
    assert all(isinstance(m, SourceNorm) for m in a.modules() if isinstance(m, AdaptiveNorm))


def test_bn_adapt_lowers_error_on_noise(source_model, noisy_stream):
    x, y = noisy_stream
    src = error(run(adapt(source_model, "source"), x, y), y)
    bn = error(run(adapt(source_model, "bn"), x, y), y)
    assert bn < 0.8 * src, (src, bn)


def test_tent_updates_only_bn_affine_and_beats_bn(source_model, noisy_stream):
    x, y = noisy_stream
    a = adapt(source_model, "tent")
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    errs = error(run(a, x, y), y)
    after = a.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bn_affine = {
        f"{n}.{p}"
        for n, m in a.model.named_modules()
        if isinstance(m, BatchStatsNorm)
        for p in ("weight", "bias")
    }
    assert changed and changed <= bn_affine
    assert all(not k.endswith(("running_mean", "running_var")) for k in changed)
    bn = error(run(adapt(source_model, "bn"), x, y), y)
    assert errs <= bn + 1.0, (errs, bn)
    assert a.counters()["backward_images"] == len(x)
    assert a.counters()["forward_images"] == len(x)


def test_reset_restores_source_bit_for_bit(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "tent")
    h0 = state_hash(a.model)
    opt0 = {k: v for k, v in a.optimizer.state_dict().items() if k != "state"}
    first = a(x[:50])
    for i in range(0, 200, 50):
        a(x[i : i + 50])
    assert state_hash(a.model) != h0
    a.reset()
    assert state_hash(a.model) == h0
    assert a.optimizer.state_dict()["state"] == {}
    assert {k: v for k, v in a.optimizer.state_dict().items() if k != "state"} == opt0
    torch.testing.assert_close(a(x[:50]), first, rtol=0, atol=0)  # same prediction after reset


def test_episodic_tent_resets_every_batch(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "tent", episodic=True)
    out1 = a(x[:50])
    a(x[50:100])
    out2 = a(x[:50])
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["source", "bn", "tent"])
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.rand(3, 32, 32), "4-D batch"),
        (torch.rand(0, 3, 32, 32), "empty batch"),
        (torch.rand(2, 1, 32, 32), "3 channels"),
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "floating-point"),
        (torch.full((2, 3, 32, 32), float("nan")), "NaN or Inf"),
        (torch.full((2, 3, 32, 32), float("inf")), "NaN or Inf"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_batches_rejected_without_state_change(source_model, method, bad, match):
    a = adapt(source_model, method)
    h = state_hash(a)
    with pytest.raises(DataError, match=match):
        a(bad)
    assert state_hash(a) == h


def test_batch_of_one_works_for_foundation_methods(source_model, noisy_stream):
    x, _ = noisy_stream
    for m in ("source", "bn", "tent"):
        out = adapt(source_model, m)(x[:1])
        assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_nonfinite_loss_skips_update(source_model, noisy_stream):
    x, _ = noisy_stream
    a = adapt(source_model, "tent")
    with torch.no_grad():
        next(p for p in a.params).fill_(float("nan"))  # poison one BN weight
    h = state_hash(a.model)
    a(x[:20])
    assert a.counters()["skipped_updates"] == 1
    assert state_hash(a.model) == h


def test_model_without_batchnorm_fails_clearly():
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    )
    with pytest.raises(ModelError, match="no BatchNorm layers"):
        adapt(plain, "bn")


def test_tent_adapts_layernorm_model_without_bn():
    """Tent on a LayerNorm model: adapts the LN affine parameters (as for ViTs)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
    )

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    from testtime.adapt.methods.tent import Tent, TentConfig

    class LNTent(Tent):
        norm_policy = None

    a = LNTent(Wrapper(), TentConfig(lr=0.1))
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    a(torch.rand(8, 3, 2, 2))
    changed = {k for k, v in a.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"net.2.weight", "net.2.bias"}


def test_default_is_our_recipe():
    from testtime.adapt.registry import DEFAULT_METHOD, get_method, resolve_method

    m = build_model("resnet20")
    assert (
        DEFAULT_METHOD == "auto" and resolve_method("default") == "auto" and resolve_method("tent") == "tent"
    )
    assert type(adapt(m)).name == "auto" and type(adapt(m, "default")).name == "auto"
    assert get_method("default") is get_method("auto")
    assert type(adapt(m)).Config().test_momentum < 1, "the shipped defaults keep running statistics"
