"""`compile=<backend>`: torch.compile of each network's forward changes nothing but speed.

The tests use the `eager` backend (Dynamo traces the forward, the captured graph runs eagerly), so
they check the wiring — tracing through every recipe's networks, hooks, teacher copies, reset —
without inductor's C++ compilation; `testtime bench --suite speed_compile` measures inductor.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from conftest import state_hash, to_batch
from test_persistence import BATCH, BATCH_OF, OVERRIDES
from testtime.adapt import adapt, get_method, list_methods
from testtime.adapt.components.compile import CompiledForward, compile_forward, uncompile_forward
from testtime.errors import ConfigError


@pytest.mark.parametrize("method", list_methods())
def test_compiled_method_is_identical_to_eager(method, source_model, noisy_stream, embedded) -> None:
    """Same logits and state as without compile, same state-dict keys, exact reset."""
    extra = {}
    if getattr(get_method(method), "requires_source_data", False) or method in ("rmt", "adanpc"):
        extra["source_data"] = (to_batch(embedded.x[-200:]), embedded.y[-200:])
    n = BATCH_OF.get(method, BATCH)
    x, _ = noisy_stream
    runs = {}
    for backend in ("off", "eager"):
        a = adapt(source_model, method, compile=backend, **extra, **OVERRIDES.get(method, {}))
        h0 = state_hash(a)
        logits = torch.cat([a(x[i * n : (i + 1) * n]) for i in range(2)])
        runs[backend] = (a, h0, logits, state_hash(a))
    (plain, h0, out0, h1), (comp, c0, out1, c1) = runs["off"], runs["eager"]
    assert any(isinstance(net.__dict__.get("forward"), CompiledForward) for net in comp.counted_networks())
    assert set(plain.state_dict()) == set(comp.state_dict())
    assert c0 == h0 and torch.equal(out0, out1) and c1 == h1, method
    assert comp.counters() == plain.counters()
    comp.reset()
    assert state_hash(comp) == h0


def test_deep_copy_of_a_compiled_network_runs_its_own_weights(source_model, noisy_stream) -> None:
    x = noisy_stream[0][:8]
    net = compile_forward(copy.deepcopy(source_model).eval(), "eager")
    twin = copy.deepcopy(net)
    assert isinstance(twin.__dict__["forward"], CompiledForward) and twin.forward.module is twin
    with torch.no_grad():
        before = net(x)
        for p in twin.parameters():
            p.mul_(0.5)
        assert torch.equal(net(x), before)  # the original is untouched by the copy's change
        assert not torch.equal(twin(x), before)
        assert torch.equal(uncompile_forward(twin)(x), twin(x))
    assert "forward" not in twin.__dict__


def test_compile_backend_is_checked(source_model) -> None:
    with pytest.raises(ConfigError, match="compile"):
        adapt(source_model, "tent", compile="no_such_backend")
    with pytest.raises(ConfigError, match="compile"):
        compile_forward(copy.deepcopy(source_model), "no_such_backend")


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_eata_backpropagates_twice_through_one_forward(noisy_stream) -> None:
    """The production backend on a small BN net: EATA's Fisher estimate backpropagates one forward
    twice (retain_graph), and the predictions match eager ones. (On the ResNet-26 inductor's donated
    buffers refused that second backward until `compile_forward` switched them off; this small graph
    has none, so it is a smoke test of the path, not a reproduction.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )  # fmt: skip
    x = noisy_stream[0][:32]
    out = {}
    for backend in ("off", "inductor"):
        # margin 1 (all of ln C) and no redundancy filter: the untrained net's samples are all selected
        a = adapt(net, "eata", compile=backend, e_margin=1.0, d_margin=2.0)
        out[backend] = torch.cat([a(x[:16]), a(x[16:])])
        assert a.tally["fisher"] == 16 and a.counters()["backward_images"] == 16 + 32  # Fisher + updates
    torch.testing.assert_close(out["inductor"], out["off"], atol=1e-4, rtol=1e-4)
