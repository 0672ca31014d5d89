"""Progress snapshots inside a cell: an interrupted stream run resumes to the uninterrupted result."""

from __future__ import annotations

import json

import pytest
import torch

from test_persistence import OVERRIDES
from testtime.adapt import adapt
from testtime.bench.experiment import ExecOptions
from testtime.bench.runner import Cell, run_stream
from testtime.bench.suites import SuiteArgs, run_suite
from testtime.data.corruptions import CIFAR10C_CORRUPTIONS
from testtime.data.streams import CorruptedDataset, StreamSpec, build_stream
from testtime.errors import DataError


class Interrupt(Exception):
    pass


def _stream(embedded, scenario: str):
    data = CorruptedDataset(embedded)
    spec = StreamSpec(data, corruptions=CIFAR10C_CORRUPTIONS[:3], batch_size=25, n_per_domain=50)
    return build_stream(scenario, spec)


def _comparable(res) -> dict:
    return {
        "per_domain": res.per_domain,
        "mean": res.mean,
        "trace": res.trace,
        "counters": res.counters,
        "resets": res.resets,
        "reliability": res.extra["reliability"],
    }


@pytest.mark.parametrize(
    ("method", "scenario"), [("tent", "reset_each_shift"), ("cotta", "continual"), ("eata", "continual")]
)
def test_interrupted_run_resumes_to_the_same_result(
    source_model, embedded, tmp_path, method, scenario
) -> None:
    stream = _stream(embedded, scenario)
    kw = OVERRIDES.get(method, {})
    full = run_stream(adapt(source_model, method, **kw), stream)

    ckpt = tmp_path / "cell.pt"

    def stop_at_4(b: int, _err: float) -> None:
        if b == 3:  # after the 4th batch (of 6), its snapshot written
            raise Interrupt

    with pytest.raises(Interrupt):
        run_stream(adapt(source_model, method, **kw), stream, stop_at_4, ckpt, checkpoint_every=0)
    assert ckpt.is_file()
    seen: list[int] = []
    resumed = run_stream(adapt(source_model, method, **kw), stream, lambda b, e: seen.append(b), ckpt, 0)
    assert seen == list(range(len(stream)))  # progress callbacks cover the resumed batches too
    assert _comparable(resumed) == _comparable(full)
    if method == "eata":
        assert resumed.extra.get("guard_events") == full.extra.get("guard_events")


def test_progress_of_another_run_is_refused(source_model, embedded, tmp_path) -> None:
    stream = _stream(embedded, "continual")
    ckpt = tmp_path / "cell.pt"
    with pytest.raises(Interrupt):
        run_stream(adapt(source_model, "bn"), stream, lambda b, e: (_ for _ in ()).throw(Interrupt), ckpt, 0)
    with pytest.raises(DataError, match="progress of another run"):
        run_stream(adapt(source_model, "tent"), stream, None, ckpt, 0)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable progress file"):
        run_stream(adapt(source_model, "bn"), stream, None, ckpt, 0)


def test_suite_keeps_progress_in_partial_and_drops_it_when_the_cell_is_written(tmp_path, monkeypatch) -> None:
    """A bench cell killed midway leaves partial/<cell>.pt; the rerun resumes it and removes it."""
    import testtime.bench.runner as runner

    real = runner.run_stream
    calls = {"n": 0}

    def dying(adapted, stream, on_batch=None, checkpoint=None, checkpoint_every=600.0):
        calls["n"] += 1

        def cb(b, e):
            if calls["n"] == 1 and b == 1:
                raise Interrupt
            if on_batch:
                on_batch(b, e)

        return real(adapted, stream, cb, checkpoint, checkpoint_every)

    import testtime.bench.experiment as experiment

    monkeypatch.setattr(experiment, "run_stream", dying)
    args = SuiteArgs(methods=["tent"], seeds=[0])
    opts = ExecOptions(threads=1, checkpoint_every=0)
    monkeypatch.setattr(
        "testtime.bench.suites.quick",
        lambda a: [
            Cell(method="tent", scenario="continual", corruptions=("fog",), n_per_domain=60, batch_size=20)
        ],
    )
    from testtime.bench import suites

    doc = "One Tent cell,\n    interrupted."
    monkeypatch.setitem(suites.SUITES, "quick", suites.Suite("quick", doc, suites.quick, (0,)))
    with pytest.raises(Interrupt):
        run_suite("quick", args, tmp_path, opts)
    partial = list((tmp_path / "quick" / "partial").glob("*.pt"))
    assert len(partial) == 1
    state = torch.load(partial[0], weights_only=True)
    assert state["batches_done"] == 2
    out = run_suite("quick", args, tmp_path, opts)
    assert not list((out / "partial").glob("*.pt"))
    (cell,) = list((out / "cells").glob("*.json"))
    payload = json.loads(cell.read_text())
    assert len(payload["trace"]) == 3
    assert payload["extra"]["device"] == "cpu (1 threads)"  # where the cell ran, with the threads it used
    assert payload["extra"]["torch"] == torch.__version__
    summary = (out / "summary.md").read_text()
    assert "One Tent cell, interrupted." in summary  # the suite's description
    assert f"- ran on cpu (1 threads), torch {torch.__version__}: tent" in summary
    execution = json.loads((out / "config.json").read_text())["execution"]
    assert execution == {"backend": "local", "jobs": 1, "threads_per_worker": 1}


def test_paper_suite_gives_the_source_set_to_methods_whose_paper_uses_it() -> None:
    from testtime.adapt import get_method, list_methods
    from testtime.bench.suites import SUITES

    cells = SUITES["paper"].build(SuiteArgs(seeds=[0], data="auto"))
    assert {c.scenario for c in cells} == {"continual", "reset_each_shift"}
    stateless = [m for m in list_methods() if not get_method(m).keeps_state]  # run once (same result)
    assert len(cells) == 2 * len(list_methods()) - len(stateless)
    given = {c.method: c.source_samples for c in cells if c.source_samples}
    assert given == {"adanpc": 50_000, "cafa": 50_000}  # AdaNPC's memory, CAFA's class statistics
