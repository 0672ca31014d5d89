"""Every registered method on a CUDA device (skipped where there is none; CI has none).

Run on a GPU machine with `pytest tests/test_cuda.py`. Each method adapts on the same short noisy
stream on the CPU and on the GPU (TF32 off, so both compute in float32): it must run, predict
nearly the same classes as on the CPU, and reset bit-for-bit. Set `TESTTIME_CUDA_REPORT=FILE` to
write each method's CPU/GPU error and prediction agreement as JSON lines.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from conftest import state_hash, to_batch
from testtime.adapt.registry import adapt, get_method, list_methods

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH = 40


@pytest.fixture(scope="module", autouse=True)
def float32_on_gpu():
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture(scope="module")
def labelled_source(embedded):
    """200 clean embedded images (20 per class) as the methods' labelled source samples."""
    idx = np.concatenate([np.flatnonzero(embedded.y == c)[-20:] for c in range(10)])
    return to_batch(embedded.x[idx]), torch.from_numpy(embedded.y[idx]).long()


def wants_source(method: str) -> bool:
    cls = get_method(method)
    return bool(getattr(cls, "requires_source_data", False) or cls.paper_source_samples > 0)


def run(adapted: torch.nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    return torch.cat([adapted(x[i : i + BATCH].to(device)).argmax(1).cpu() for i in range(0, len(x), BATCH)])


@pytest.mark.parametrize("method", list_methods())
def test_method_runs_on_cuda_like_on_cpu_and_resets(
    method, source_model, noisy_stream, labelled_source
) -> None:
    n = BATCH if method == "memo" else 3 * BATCH  # MEMO: 32 augmented passes per image, slow on the CPU
    x, y = noisy_stream[0][:n], noisy_stream[1][:n]
    src = labelled_source if wants_source(method) else None
    preds, errors = {}, {}
    for device in ("cpu", "cuda"):
        adapted = adapt(copy.deepcopy(source_model).to(device), method, source_data=src)
        start = state_hash(adapted)
        preds[device] = run(adapted, x, device)
        errors[device] = 100 * float((preds[device] != y).float().mean())
        adapted.reset()
        assert state_hash(adapted) == start, f"{method}: reset on {device} did not restore the source state"
    agree = 100 * float((preds["cpu"] == preds["cuda"]).float().mean())
    if os.environ.get("TESTTIME_CUDA_REPORT"):
        with open(os.environ["TESTTIME_CUDA_REPORT"], "a") as f:
            f.write(json.dumps({"method": method, "n": n, "error": errors, "agreement": agree}) + "\n")
    assert agree >= 90, f"{method}: CPU and GPU predictions agree on only {agree:.1f}% ({errors})"


@pytest.mark.parametrize(
    ("method", "with_source"), [("tent", False), ("rmt", False), ("adanpc", True), ("eata", True)]
)
def test_moving_an_adapted_model_moves_its_source_data_and_guard(
    method, with_source, source_model, noisy_stream, labelled_source
) -> None:
    """`adapt(model_on_cpu, ...).to("cuda")`: source samples, guard reference and buffers follow."""
    src = labelled_source if with_source else None
    adapted = adapt(copy.deepcopy(source_model), method, source_data=src).to("cuda")
    assert all(t.is_cuda for t in adapted.state_dict().values() if isinstance(t, torch.Tensor))
    if adapted.source_data is not None:
        assert adapted.source_data[0].is_cuda and adapted.source_data[1].is_cuda
    out = run(adapted, noisy_stream[0][: 2 * BATCH], "cuda")
    assert out.shape == (2 * BATCH,)
    adapted.to("cpu")
    assert run(adapted, noisy_stream[0][:BATCH], "cpu").shape == (BATCH,)


def test_bench_cells_on_cuda_record_the_gpu_and_spawn_workers(tmp_path, monkeypatch) -> None:
    from testtime.bench import suites
    from testtime.bench.experiment import ExecOptions
    from testtime.bench.runner import Cell
    from testtime.bench.suites import Suite, SuiteArgs, run_suite

    def cells(args):
        base = {"dataset": "cifar10", "data": "embedded", "batch_size": 20, "n_per_domain": 40}
        return [Cell(method=m, scenario="continual", corruptions=("fog",), **base) for m in ("tent", "cotta")]

    monkeypatch.setitem(suites.SUITES, "gpu", Suite("gpu", "Tent and CoTTA on CUDA.", cells, (0,)))
    opts = ExecOptions(device="cuda", threads=1)
    seq = run_suite("gpu", SuiteArgs(), tmp_path / "seq", opts)
    par = run_suite("gpu", SuiteArgs(), tmp_path / "par", opts, jobs=2)  # spawned workers on the GPU
    for cell in (seq / "cells").glob("*.json"):
        a, b = json.loads(cell.read_text()), json.loads((par / "cells" / cell.name).read_text())
        assert a["extra"]["device"].startswith("cuda:0 (") and b["extra"]["device"] == a["extra"]["device"]
        errs = [r["value"] for r in a["rows"] if r["metric"] == "error"]
        assert errs and errs == [r["value"] for r in b["rows"] if r["metric"] == "error"]
    assert len(list((par / "cells").glob("*.json"))) == 2
