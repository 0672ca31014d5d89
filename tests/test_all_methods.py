"""Contract every registered method must meet (method-specific behaviour is in test_method_*.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import state_hash, to_batch
from testtime.adapt import adapt, get_method, list_methods
from testtime.errors import DataError

METHODS = list_methods()


def make(model, method, embedded):
    """`adapt(model, method)`, giving clean labelled images to methods that cannot run without them."""
    if getattr(get_method(method), "requires_source_data", False):
        return adapt(model, method, source_data=(to_batch(embedded.x[-500:]), embedded.y[-500:]))
    return adapt(model, method)


@pytest.mark.parametrize("method", METHODS)
def test_method_is_documented(method):
    cls = get_method(method)
    mod = __import__(cls.__module__, fromlist=["_"])
    doc = mod.__doc__ or ""
    assert cls.paper and (cls.__doc__ or "").strip(), method
    if method != "source":
        assert "Deviations" in doc and "|" in doc, (
            f"{method}: module docstring needs a defaults table and deviations"
        )


@pytest.mark.parametrize("method", METHODS)
def test_runs_and_reset_restores_exactly(method, source_model, noisy_stream, embedded):
    x, _ = noisy_stream
    a = make(source_model, method, embedded)
    h0 = state_hash(a)
    first = a(x[:64])
    assert first.shape == (64, 10) and torch.isfinite(first).all()
    for i in range(64, 256, 64):
        out = a(x[i : i + 64])
        assert out.shape == (64, 10) and torch.isfinite(out).all()
    c = a.counters()
    assert c["images"] == 256 and c["forward_images"] >= 256
    a.reset()
    assert state_hash(a) == h0, f"{method}: reset() did not restore the state bit for bit"
    again = a(x[:64])
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_one_works_or_fails_clearly(method, source_model, noisy_stream, embedded):
    x, _ = noisy_stream
    a = make(source_model, method, embedded)
    cls = get_method(method)
    if cls.min_batch_size > 1:
        h = state_hash(a)
        with pytest.raises(DataError, match=method):
            a(x[:1])
        assert state_hash(a) == h
    else:
        for i in range(3):
            out = a(x[i : i + 1])
            assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_leaves_state_unchanged(method, source_model, embedded):
    a = make(source_model, method, embedded)
    h = state_hash(a)
    for bad in (torch.rand(0, 3, 32, 32), torch.full((4, 3, 32, 32), float("nan")), torch.rand(4, 32, 32)):
        with pytest.raises(DataError):
            a(bad)
    assert state_hash(a) == h
