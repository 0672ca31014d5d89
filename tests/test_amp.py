"""Mixed precision (`amp="bf16"`): same predictions up to bf16 rounding, float32 state, exact reset."""

from __future__ import annotations

import pytest
import torch

from conftest import state_hash, to_batch
from test_persistence import BATCH, BATCH_OF, OVERRIDES
from testtime.adapt import adapt, get_method, list_methods
from testtime.errors import ConfigError


@pytest.mark.parametrize("method", ["bn", "tent", "eata"])
def test_bf16_autocast_keeps_float32_state_and_close_predictions(source_model, noisy_stream, method) -> None:
    x, y = noisy_stream
    x, y = x[:200], y[:200]
    full, half = adapt(source_model, method), adapt(source_model, method, amp="bf16")
    h0 = state_hash(half)
    err = {}
    for name, a in (("fp32", full), ("bf16", half)):
        preds = torch.cat([a(x[i : i + 50]).argmax(1) for i in range(0, len(x), 50)])
        err[name] = float((preds != y).float().mean())
    out = half(x[:50])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert abs(err["fp32"] - err["bf16"]) <= 0.05, err  # bf16 rounding changes a few predictions at most
    for k, v in half.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.dtype == torch.float32, k
    half.reset()
    assert state_hash(half) == h0


def test_amp_values_are_checked(source_model) -> None:
    with pytest.raises(ConfigError, match="amp"):
        adapt(source_model, "tent", amp="fp8")


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_under_bf16(method, source_model, noisy_stream, embedded) -> None:
    """Every recipe under autocast: finite float32 predictions, float32 state, exact reset."""
    extra = {}
    if getattr(get_method(method), "requires_source_data", False) or method in ("rmt", "adanpc"):
        extra["source_data"] = (to_batch(embedded.x[-200:]), embedded.y[-200:])
    a = adapt(source_model, method, amp="bf16", **extra, **OVERRIDES.get(method, {}))
    h0 = state_hash(a)
    n = BATCH_OF.get(method, BATCH)
    x, _ = noisy_stream
    for i in range(3):
        out = a(x[i * n : (i + 1) * n])
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), method
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.dtype == torch.float32, (method, k)
    a.reset()
    assert state_hash(a) == h0
