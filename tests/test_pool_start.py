"""`bench --jobs N`: workers on an accelerator start by `spawn` (CUDA cannot run in a forked child)."""

from __future__ import annotations

import json

import pytest
import torch

from testtime.bench import suites
from testtime.bench.experiment import ExecOptions
from testtime.bench.runner import Cell
from testtime.bench.suites import Suite, SuiteArgs, pool_start_method, run_suite
from testtime.errors import ConfigError


def two_cells(args: SuiteArgs) -> list[Cell]:
    """Source and Tent on 40 embedded images of one corruption, batch 20."""
    base = {
        "dataset": "cifar10",
        "data": "embedded",
        "batch_size": 20,
        "n_per_domain": 40,
        "corruptions": ("fog",),
    }
    return [Cell(method=m, scenario="continual", seed=0, **base) for m in ("source", "tent")]


def test_start_method_follows_the_device(monkeypatch) -> None:
    assert pool_start_method("cpu") is None  # the platform's default, as before
    monkeypatch.setattr(suites, "select_device", lambda name: torch.device("cuda"))
    assert pool_start_method("cuda") == "spawn"
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pool_start_method("cuda")


def test_spawned_workers_give_the_sequential_results(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(suites.SUITES, "two", Suite("two", two_cells.__doc__ or "", two_cells, (0,)))
    threads = torch.get_num_threads()
    opts = ExecOptions(device="cpu", threads=1)
    seq = run_suite("two", SuiteArgs(), tmp_path / "seq", opts)
    monkeypatch.setattr(suites, "pool_start_method", lambda device: "spawn")
    par = run_suite("two", SuiteArgs(), tmp_path / "par", opts, jobs=2)
    torch.set_num_threads(threads)
    for cell in (seq / "cells").glob("*.json"):
        a, b = json.loads(cell.read_text()), json.loads((par / "cells" / cell.name).read_text())
        errors = [r for r in a["rows"] if r["metric"] == "error"]
        assert errors and errors == [r for r in b["rows"] if r["metric"] == "error"]
        assert a["trace"] == b["trace"]
    assert len(list((par / "cells").glob("*.json"))) == 2
