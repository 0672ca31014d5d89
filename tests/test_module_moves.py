"""`.to()` on an adapted model moves everything it adapts with: buffers, source samples, optimizer
moments (the CPU stand-in for a device move: a dtype change goes through the same `_apply`)."""

from __future__ import annotations

import copy

import torch

from testtime.adapt.registry import adapt


def test_optimizer_moments_and_source_data_follow_a_conversion(source_model, noisy_stream) -> None:
    x = noisy_stream[0][:40]
    src = (noisy_stream[0][40:80], noisy_stream[1][40:80])
    adapted = adapt(copy.deepcopy(source_model), "eata", source_data=src)
    adapted(x[:20])  # creates the optimizer's momentum buffers
    assert adapted.optimizer is not None and adapted.optimizer.state
    adapted.double()
    moments = [v for s in adapted.optimizer.state.values() for v in s.values() if v.dim() > 0]
    assert moments and all(v.dtype == torch.float64 for v in moments)
    assert adapted.source_data is not None and adapted.source_data[0].dtype == torch.float64
    assert adapted.source_data[1].dtype == torch.long  # labels are not floating: unchanged
    out = adapted(x[20:].double())  # adapts again in float64 (mixed dtypes would raise)
    assert out.shape == (20, 10) and bool(torch.isfinite(out).all())
