"""The speed suite (`testtime bench --suite speed`) and the declared minimal passes of every method."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import to_batch
from testtime.adapt import adapt, get_method, list_methods
from testtime.adapt.components.passes import Passes
from testtime.bench import speed
from testtime.bench.experiment import ExecOptions
from testtime.bench.suites import SUITES, SuiteArgs, run_suite

METHODS = list_methods()
# fewer augmented views than the defaults (32) and a smaller RoTTA memory (updated every 16
# instead of 64 images) keep the test fast; the pass logic is the same
FAST = {
    "cotta": {"n_augment": 4},
    "petal": {"n_augment": 4},
    "memo": {"n_augmentations": 4},
    "rotta": {"memory_size": 16, "update_frequency": 16},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy two-core machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(model, method, embedded):
    kw = dict(FAST.get(method, {}))
    if getattr(get_method(method), "requires_source_data", False):
        kw["source_data"] = (to_batch(embedded.x[-500:]), embedded.y[-500:])
    return adapt(model, method, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_measured_passes_are_the_declared_minimum(method, source_model, noisy_stream, embedded):
    """Image passes counted on the networks stay within 1.2x of what the algorithm needs (and the
    declared minimum is not above what the method does)."""
    x, _ = noisy_stream
    a = make(source_model, method, embedded)
    bs, n = (2, 4) if method == "memo" else (16, 32)
    for i in range(0, n, bs):
        a(x[i : i + bs])
    minimal = a.minimal_passes()
    assert isinstance(minimal, Passes) and minimal.why, method
    c = a.counters()
    measured = {"forward": c["forward_images"] / n, "backward": c["backward_images"] / n}
    for kind in ("forward", "backward"):
        need = getattr(minimal, kind)
        assert need - 1e-9 <= measured[kind] <= 1.2 * need + 1e-9, (
            f"{method}: {kind} passes per image {measured[kind]:.3f}, declared minimum {need:.3f}"
        )
    if method in ("cotta", "petal"):  # the conditional passes were exercised
        assert a.tally["augmented"] > 0
    if method == "rotta":
        assert a.tally["replayed"] > 0


def test_minimum_follows_run_time_decisions(source_model, noisy_stream):
    x, _ = noisy_stream
    confident = adapt(source_model, "cotta", anchor_threshold=0.0)  # anchor always sure: no views
    confident(x[:32])
    assert confident.minimal_passes().forward == confident.counters()["forward_images"] / 32 == 3
    e = adapt(source_model, "eata")  # Fisher from the first test batch: one extra backward there
    e(x[:32])
    e(x[32:64])
    assert e.minimal_passes().backward == 1.5 == e.counters()["backward_images"] / 64


def test_memory_kept_is_counted_in_tensor_bytes(source_model, noisy_stream):
    x, _ = noisy_stream
    model_bytes = speed.tensor_bytes(source_model.state_dict().values())
    bn = adapt(source_model, "bn")
    mem = speed.memory_kept(bn, source_model)
    assert mem["state"] < 1000 and mem["optimizer"] == 0 and mem["guard"] == 0  # counters only
    cotta = adapt(source_model, "cotta", n_augment=2)
    cotta(x[:16])
    mem = speed.memory_kept(cotta, source_model)
    assert mem["state"] >= 2 * model_bytes * 0.99  # teacher and anchor
    assert mem["optimizer"] > 0 and mem["guard"] == model_bytes
    assert mem["snapshot"] >= mem["state"]
    assert speed.adapted_params(cotta) == sum(p.numel() for p in source_model.parameters())


def test_speed_suite_output_schema(tmp_path, monkeypatch):
    """`testtime bench --suite speed` on a tiny stream: one run, tidy CSV, JSON, markdown table."""
    assert "speed" in SUITES
    monkeypatch.setattr(speed, "CORRUPTIONS", ("gaussian_noise", "contrast"))
    monkeypatch.setattr(speed, "PER_DOMAIN", 8)
    monkeypatch.setattr(speed, "BATCH_SIZE", 8)
    monkeypatch.setattr(speed, "SLICES", {"tent": (4, 4)})
    methods = ["source", "bn", "tent"]
    out = run_suite("speed", SuiteArgs(methods=methods), tmp_path, ExecOptions(threads=1), jobs=2)
    assert out == tmp_path / "speed"
    assert len(list((out / "cells").glob("*.json"))) == len(methods)
    summary = json.loads((out / "speed.json").read_text())
    assert summary["torch_threads"] == 1 and len(summary["loadavg_start"]) == 3
    assert summary["wall_seconds"] > 0 and "tensor bytes" in summary["memory_note"]
    by = {m["method"]: m for m in summary["methods"]}
    assert list(by) == methods
    for m, s in by.items():
        for k in ("images_per_s", "x_inference", "forward_per_image", "min_forward_per_image",
                  "backward_per_image", "min_backward_per_image", "adapted_params", "state_bytes",
                  "optimizer_bytes", "guard_bytes", "snapshot_bytes", "loadavg_1m", "torch_threads",
                  "error"):  # fmt: skip
            assert k in s, (m, k)
        assert s["x_inference"] > 0 and s["forward_per_image"] == s["min_forward_per_image"]
    assert by["source"]["n_images"] == by["bn"]["n_images"] == 16 and by["tent"]["n_images"] == 8
    assert by["source"]["adapted_params"] == by["bn"]["adapted_params"] == 0
    assert by["tent"]["adapted_params"] > 0 and by["tent"]["optimizer_bytes"] > 0
    assert by["tent"]["min_backward_per_image"] == 1 and by["bn"]["min_backward_per_image"] == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = {r["metric"] for r in rows if r["corruption"] == "all"}
    assert {"x_inference", "inference_seconds", "min_forward_per_image", "state_bytes"} <= metrics
    md = (out / "summary.md").read_text()
    assert "## Speed" in md and "| tent |" in md and "x inference" in md
    assert summary["table"][0].startswith("| method | images | batch | img/s | x inference")
    cfg = json.loads((out / "config.json").read_text())
    assert "embedded CIFAR-10" in cfg["data_description"] and "contrast" in cfg["data_description"]
    assert {"fast", "how", "factor", "cpu_capability", "summary"} <= set(cfg["precision"])
    assert {m["bf16"] for m in summary["methods"]} == {0.0}  # amp off: float32
    assert summary["table"][2].split(" | ")[5] == "fp32" and "This machine: bf16" in "\n".join(
        summary["table"]
    )

    # a second run replaces the first one's results: the table is always one run
    run_suite("speed", SuiteArgs(methods=["source"]), tmp_path, ExecOptions(threads=1))
    assert [m["method"] for m in json.loads((out / "speed.json").read_text())["methods"]] == ["source"]
    assert len(list((out / "cells").glob("*.json"))) == 1


@pytest.mark.parametrize(
    ("suite", "world", "label"),
    [
        ("speed_bf16", "fast", "bf16"),
        ("speed_bf16", "slow", "fp32 (bf16 slow here)"),
        ("speed_auto", "fast", "bf16 (auto)"),
        ("speed_auto", "slow", "fp32 (auto)"),
    ],
)
def test_speed_precision_suites_state_the_precision_that_ran(tmp_path, monkeypatch, suite, world, label):
    """amp=bf16 / amp=auto under bf16 detection forced fast or slow ($TESTTIME_BF16): the precision
    column and speed.json say what ran, and the run records the detection."""
    from testtime import precision

    amp = {"speed_bf16": "bf16", "speed_auto": "auto"}[suite]
    cells = SUITES[suite].build(SuiteArgs(methods=["source", "tent"], seeds=[0]))
    assert [dict(c.overrides) for c in cells] == [{"amp": amp}, {"amp": amp}]
    monkeypatch.setenv(precision.ENV, world)
    precision.clear_cache()
    monkeypatch.setattr(speed, "CORRUPTIONS", ("gaussian_noise",))
    monkeypatch.setattr(speed, "PER_DOMAIN", 8)
    monkeypatch.setattr(speed, "BATCH_SIZE", 8)
    out = run_suite(suite, SuiteArgs(methods=["tent"]), tmp_path, ExecOptions(threads=1))
    summary = json.loads((out / "speed.json").read_text())
    (m,) = summary["methods"]
    assert m["method"] == "tent" and m["n_images"] == 8 and m["backward_per_image"] == 1
    assert m["bf16"] == (world == "fast") and m["amp_requested"] == precision.AMP_CODES[amp]
    assert summary["table"][0].split(" | ")[5] == "precision"
    assert summary["table"][2].split(" | ")[5] == label
    assert (
        summary["precision"]["fast"] is (world == "fast") and "TESTTIME_BF16" in summary["precision"]["how"]
    )
    assert "capability" in summary["precision"]["summary"]
    assert json.loads((out / "config.json").read_text())["precision"]["fast"] is (world == "fast")
    assert label in (out / "summary.md").read_text()
    precision.clear_cache()


def test_speed_compile_suite_times_after_an_untimed_compiling_pass(tmp_path, monkeypatch):
    from testtime.bench.suites import SPEED_VARIANTS

    cells = SUITES["speed_compile"].build(SuiteArgs(methods=["bn", "tent"], seeds=[0]))
    assert [dict(c.overrides) for c in cells] == [{"compile": "inductor"}] * 2
    monkeypatch.setitem(SPEED_VARIANTS["speed_compile"][0], "compile", "eager")  # no C++ build in tests
    monkeypatch.setattr(speed, "CORRUPTIONS", ("gaussian_noise",))
    monkeypatch.setattr(speed, "PER_DOMAIN", 8)
    monkeypatch.setattr(speed, "BATCH_SIZE", 4)
    out = run_suite("speed_compile", SuiteArgs(methods=["eata"]), tmp_path, ExecOptions(threads=1))
    (m,) = json.loads((out / "speed.json").read_text())["methods"]
    # the compiling pass is not counted (images, passes, EATA's Fisher tally); its time is recorded apart
    assert m["method"] == "eata" and m["n_images"] == 8 and m["compile_warmup_seconds"] > 0
    assert m["backward_per_image"] == m["min_backward_per_image"] > 1  # 1 + the first batch's Fisher
    assert m["forward_per_image"] == m["min_forward_per_image"] == 1
