"""Mixed precision (`amp`): bf16 autocast with float32 state and exact reset; bf16 only where it is
fast (detection in testtime.precision, mocked both ways here), a warning and float32 where it is slow."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from rich.console import Console

from conftest import state_hash, to_batch
from test_persistence import BATCH, BATCH_OF, OVERRIDES
from testtime import precision
from testtime.adapt import adapt, get_method, list_methods
from testtime.adapt.config import with_overrides
from testtime.errors import ConfigError


@pytest.mark.parametrize("method", ["bn", "tent", "eata"])
def test_bf16_autocast_keeps_float32_state_and_close_predictions(source_model, noisy_stream, method) -> None:
    x, y = noisy_stream
    x, y = x[:200], y[:200]
    full, half = adapt(source_model, method), adapt(source_model, method, amp="bf16!")
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


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_under_bf16(method, source_model, noisy_stream, embedded) -> None:
    """Every recipe under autocast: finite float32 predictions, float32 state, exact reset."""
    extra = {}
    if getattr(get_method(method), "requires_source_data", False) or method in ("rmt", "adanpc"):
        extra["source_data"] = (to_batch(embedded.x[-200:]), embedded.y[-200:])
    a = adapt(source_model, method, amp="bf16!", **extra, **OVERRIDES.get(method, {}))
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


# ----------------------------------------------------------------------------- bf16 only where fast
@pytest.fixture(autouse=True)
def fresh_detection(tmp_path, monkeypatch):
    """Each test detects afresh, with its own benchmark cache and no environment override."""
    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV, raising=False)
    precision.clear_cache()
    yield
    precision.clear_cache()


def mock_cpu(monkeypatch, flags: set[str], factor: float) -> list[int]:
    """A CPU with these flags on which the micro-benchmark measures `factor`; returns a call counter."""
    calls: list[int] = []

    def bench(**_: object) -> dict[str, float]:
        calls.append(1)
        return {"fp32_seconds": 0.05, "bf16_seconds": 0.05 * factor, "factor": factor}

    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(precision, "measure_cpu_factor", bench)
    return calls


FAST_CPU = ({"avx2", "avx512f", "avx512_bf16"}, 0.55)  # e.g. this project's AVX512-BF16 machine
SLOW_CPU = ({"avx2"}, 9.6)  # the AVX2-only EPYC: bf16 about 10x slower


def conv_dtype(a, x) -> torch.dtype:
    """The dtype the first convolution of the adapted model computes in on batch `x`."""
    conv = next(m for m in a.model.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[torch.dtype] = []
    hook = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        a(x)
    finally:
        hook.remove()
    return seen[0]


def test_detection_mocked_fast_and_slow_and_cached(monkeypatch) -> None:
    calls = mock_cpu(monkeypatch, *FAST_CPU)
    s = precision.bf16_support("cpu")
    assert s.fast and s.factor == 0.55 and s.cpu_bf16_instructions and "measured now" in s.how
    precision.clear_cache()  # a new process: the file cache answers, no second measurement
    s = precision.bf16_support("cpu")
    assert s.fast and "(cached)" in s.how and len(calls) == 1
    assert precision.cache_path().is_file()

    # the instructions alone are not enough: a benchmark that disagrees makes bf16 "not fast"
    precision.clear_cache()
    monkeypatch.setenv("TESTTIME_CACHE", str(precision.cache_path().parent / "other"))
    mock_cpu(monkeypatch, {"avx512_bf16"}, 1.3)
    s = precision.bf16_support("cpu")
    assert not s.fast and "disagrees" in s.how

    precision.clear_cache()
    mock_cpu(monkeypatch, *SLOW_CPU)
    s = precision.bf16_support("cpu")
    assert not s.fast and s.factor == 9.6 and not s.cpu_bf16_instructions and "no AVX512-BF16" in s.how
    rec = precision.precision_record("cpu")
    assert rec["fast"] is False and rec["cpu_capability"] and "not fast" in rec["summary"]


def test_environment_overrides_detection(monkeypatch) -> None:
    calls = mock_cpu(monkeypatch, *SLOW_CPU)
    monkeypatch.setenv(precision.ENV, "fast")
    assert precision.bf16_support("cpu").fast and "TESTTIME_BF16=fast" in precision.bf16_support().how
    monkeypatch.setenv(precision.ENV, "slow")
    assert not precision.bf16_support("cpu").fast
    assert not calls  # an override measures nothing
    monkeypatch.setenv(precision.ENV, "sometimes")
    with pytest.raises(ConfigError, match="TESTTIME_BF16"):
        precision.bf16_support("cpu")


def test_bf16_where_slow_warns_once_and_runs_float32(monkeypatch, caplog, source_model, noisy_stream) -> None:
    mock_cpu(monkeypatch, *SLOW_CPU)
    x = noisy_stream[0][:16]
    plain, asked = (
        adapt(source_model, "tent", guard=False),
        adapt(source_model, "tent", amp="bf16", guard=False),
    )
    with caplog.at_level(logging.WARNING, logger="testtime"):
        assert conv_dtype(asked, x[:8]) == torch.float32  # autocast not enabled
        out = asked(x[8:])
        adapt(source_model, "bn", amp="bf16")(x[:8])  # another method: still one warning
    warned = [r for r in caplog.records if "amp=bf16 ignored" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert "9.6x the float32 time" in warned[0].getMessage() and "bf16!" in warned[0].getMessage()
    plain(x[:8])
    assert torch.equal(out, plain(x[8:]))  # the fallback is float32 exactly (adapted state included)
    assert asked.describe()["precision"] == "fp32"


def test_forced_bf16_runs_bf16_where_slow(monkeypatch, caplog, source_model, noisy_stream) -> None:
    calls = mock_cpu(monkeypatch, *SLOW_CPU)
    forced = adapt(source_model, "tent", amp="bf16!", guard=False)
    with caplog.at_level(logging.WARNING, logger="testtime"):
        assert conv_dtype(forced, noisy_stream[0][:8]) == torch.bfloat16
    assert not caplog.records and not calls and forced.describe()["precision"] == "bf16"


@pytest.mark.parametrize(("world", "expect"), [(FAST_CPU, torch.bfloat16), (SLOW_CPU, torch.float32)])
def test_auto_and_bf16_follow_the_detection(world, expect, monkeypatch, caplog, source_model, noisy_stream):
    mock_cpu(monkeypatch, *world)
    x = noisy_stream[0][:8]
    with caplog.at_level(logging.WARNING, logger="testtime"):
        auto = adapt(source_model, "tent", amp="auto", guard=False)
        assert conv_dtype(auto, x) == expect
    assert not caplog.records  # auto never warns
    assert conv_dtype(adapt(source_model, "bn", amp="bf16", guard=False), x) == expect
    assert conv_dtype(adapt(source_model, "bn", guard=False), x) == torch.float32  # off: float32 everywhere
    want = "bf16" if expect == torch.bfloat16 else "fp32"
    assert auto.describe()["precision"] == want == precision.effective_precision("auto")


@pytest.mark.parametrize("value", ["off", "bf16", "bf16!", "auto"])
def test_amp_values_accepted(value) -> None:
    cfg = with_overrides(get_method("tent").Config(), {"amp": value})  # as `-o amp=VALUE` gives it
    assert cfg.amp == value


@pytest.mark.parametrize("value", ["fp8", "BF16", "bf16_force", "", "on"])
def test_amp_values_are_checked(source_model, value) -> None:
    with pytest.raises(ConfigError, match=r"amp=.*must be off, bf16, bf16! \(forced\) or auto"):
        adapt(source_model, "tent", amp=value)


def test_run_records_the_detection_and_the_precision_used(monkeypatch, tmp_path) -> None:
    from testtime.bench.experiment import ExecOptions, RunConfig, run_experiment

    mock_cpu(monkeypatch, *SLOW_CPU)
    cfg = RunConfig(
        methods=["bn"], corruptions=["gaussian_noise"], n_per_domain=16, batch_size=16,
        overrides={"amp": "auto"}, out=str(tmp_path), run_id="r",
        exec=ExecOptions(threads=1, cache_dir=str(tmp_path / "c")),
    )  # fmt: skip
    out = run_experiment(cfg, Console(quiet=True))
    rec = json.loads((out / "config.json").read_text())["precision"]
    assert rec["fast"] is False and rec["factor"] == 9.6 and rec["device"] == "cpu"
    assert {"how", "cpu_capability", "cpu_bf16_instructions", "summary"} <= set(rec)
    (cell,) = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert cell["method"]["precision"] == cell["extra"]["precision"] == "fp32"


@pytest.mark.parametrize(("env", "want"), [("fast", "bf16"), ("slow", "fp32")])
def test_train_source_uses_bf16_only_where_fast(env, want, monkeypatch, tmp_path, embedded) -> None:
    from testtime.models.train import TrainConfig, train_source

    monkeypatch.setenv(precision.ENV, env)
    seen: list[bool] = []
    real = torch.autocast

    def spy(*args, **kwargs):
        seen.append(bool(kwargs.get("enabled", True)))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    cfg = TrainConfig(arch="resnet20", epochs=1, batch_size=32, warmup_epochs=1, eval_every=5)
    train_source(cfg, (embedded.x[:64], embedded.y[:64]), None, tmp_path, progress=False)
    assert seen and all(s == (want == "bf16") for s in seen)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["precision"] == want and log["bf16_detection"]["fast"] is (want == "bf16")
