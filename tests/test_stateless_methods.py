"""Methods that declare `keeps_state = False`: nothing but the random generator carries over from
one batch to the next, so reset_each_shift is the same experiment as continual."""

from __future__ import annotations

import hashlib

import pytest

from test_persistence import OVERRIDES
from testtime.adapt import adapt, get_method, list_methods
from testtime.adapt.base import AdaptedModel
from testtime.bench.runner import run_stream
from testtime.data.corruptions import CIFAR10C_CORRUPTIONS
from testtime.data.streams import CorruptedDataset, StreamSpec, build_stream
from testtime.utils import _feed_digest

STATELESS = [m for m in list_methods() if not get_method(m).keeps_state]
RANDOM = {"memo"}  # draws augmentations: a reset replays the draws, so results differ by sampling only


def _state_but_rng(model: AdaptedModel) -> str:
    h = hashlib.sha256()
    sd = {k: v for k, v in model.state_dict().items() if k not in AdaptedModel.COUNTERS}
    sd = {k: ({kk: vv for kk, vv in v.items() if kk != "rng"} if k.endswith("_extra_state") else v)
          for k, v in sd.items()}  # fmt: skip
    _feed_digest(h, sd)
    return h.hexdigest()


def _run(model, embedded, method: str, scenario: str) -> dict:
    spec = StreamSpec(CorruptedDataset(embedded), corruptions=CIFAR10C_CORRUPTIONS[:3], batch_size=10,
                      n_per_domain=20)  # fmt: skip
    res = run_stream(adapt(model, method, **OVERRIDES.get(method, {})), build_stream(scenario, spec))
    return {"per_domain": res.per_domain, "trace": res.trace, "reliability": res.extra["reliability"],
            "resets": res.resets}  # fmt: skip


def test_the_stateless_set_is_what_the_docs_say() -> None:
    assert set(STATELESS) == {"source", "bn", "lame", "memo", "alpha_bn"}


@pytest.mark.parametrize("method", STATELESS)
def test_stateless_methods_carry_nothing_but_the_random_stream(source_model, noisy_stream, method) -> None:
    x, _ = noisy_stream
    m = adapt(source_model, method, **OVERRIDES.get(method, {}))
    before = _state_but_rng(m)
    for i in range(2):
        m(x[i * 10 : (i + 1) * 10])
        assert _state_but_rng(m) == before


@pytest.mark.parametrize("method", [*(m for m in STATELESS if m not in RANDOM), "tent"])
def test_reset_each_shift_equals_continual_exactly(source_model, embedded, method) -> None:
    cont = _run(source_model, embedded, method, "continual")
    reset = _run(source_model, embedded, method, "reset_each_shift")
    assert reset.pop("resets") > 0 and cont.pop("resets") == 0
    if method == "tent":  # control: a method that adapts weights is changed by the resets
        assert reset != cont
    else:
        assert reset == cont


def test_paper_suite_runs_stateless_methods_once() -> None:
    from testtime.bench.suites import SUITES, SuiteArgs

    cells = SUITES["paper"].build(SuiteArgs(seeds=[0], data="auto"))
    stateful = set(list_methods()) - set(STATELESS)
    assert {c.method for c in cells if c.scenario == "reset_each_shift"} == stateful
    assert {c.method for c in cells if c.scenario == "continual"} == set(list_methods())
