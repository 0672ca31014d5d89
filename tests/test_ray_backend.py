"""`testtime bench --backend ray`: cells as tasks on a real local Ray instance, merged by the driver."""

from __future__ import annotations

import builtins
import csv
from collections import Counter
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from testtime import errors  # noqa: E402
from testtime.bench import ray_backend, suites  # noqa: E402
from testtime.bench.experiment import ExecOptions  # noqa: E402
from testtime.bench.runner import Cell  # noqa: E402
from testtime.bench.suites import Suite, SuiteArgs, run_suite  # noqa: E402
from testtime.cli import main  # noqa: E402
from testtime.errors import ConfigError  # noqa: E402

METHODS = ["source", "bn", "tent"]


def tiny(args: SuiteArgs) -> list[Cell]:
    """3 methods x 2 seeds on 2 corruptions of embedded CIFAR-10, 20 images each, batch 10."""
    base = {"dataset": "cifar10", "data": "embedded", "batch_size": 10, "n_per_domain": 20,
            "corruptions": ("gaussian_noise", "contrast")}  # fmt: skip
    return [Cell(method=m, scenario="continual", seed=s, **base) for s in args.seeds for m in METHODS]


@pytest.fixture(autouse=True)
def tiny_suite(monkeypatch):
    monkeypatch.setitem(suites.SUITES, "tiny", Suite("tiny", tiny.__doc__ or "", tiny, (0, 1)))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the sequential runs set 1 thread in this process


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def key(r: dict[str, str]) -> tuple[str, ...]:
    return tuple(
        r[k] for k in ("dataset", "method", "scenario", "seed", "batch_size", "corruption", "metric")
    )


def quality(out: Path) -> dict[tuple[str, ...], float]:
    """Every metric of every cell except wall-clock cost (seconds, images/s, memory)."""
    cost = {"seconds", "images_per_s", "peak_rss_mb"}
    return {key(r): float(r["value"]) for r in rows(out) if r["metric"] not in cost}


def test_ray_sweep_equals_sequential_and_resumes(tmp_path):
    opts = ExecOptions(device="cpu", threads=1)
    local = run_suite("tiny", SuiteArgs(seeds=[0, 1]), tmp_path / "local", opts)
    assert not ray.is_initialized()
    # a local Ray instance (2 CPUs) started and shut down by the backend
    out = run_suite("tiny", SuiteArgs(seeds=[0, 1]), tmp_path / "ray", opts, jobs=2, backend="ray")
    assert not ray.is_initialized()
    assert out == tmp_path / "ray" / "tiny"
    ids = {c.cell_id for c in tiny(SuiteArgs(seeds=[0, 1]))}
    assert {p.stem for p in (out / "cells").glob("*.json")} == ids
    got = rows(out)
    dup = [k for k, n in Counter(map(key, got)).items() if n > 1]
    assert not dup and len(got) == len(rows(local))
    cells = {(r["method"], r["seed"]) for r in got}
    assert cells == {(m, str(s)) for m in METHODS for s in (0, 1)}
    # seeded cells with the same thread count: identical metrics (only timings differ)
    assert quality(out) == quality(local)
    errors = [v for k, v in quality(out).items() if k[5] == "mean" and k[6] == "error"]
    assert len(errors) == 6 and len(set(errors)) > 1  # the check compares real, differing values

    # resume: drop two finished cells (and the CSV); only those two run again, no duplicates
    gone = sorted(ids)[:2]
    for cid in gone:
        (out / "cells" / f"{cid}.json").unlink()
    (out / "results.csv").unlink()
    mtimes = {p.stem: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    ray.init(num_cpus=2, include_dashboard=False)  # an open session is reused (and left open)
    try:
        run_suite("tiny", SuiteArgs(seeds=[0, 1]), tmp_path / "ray", opts, jobs=2, backend="ray")
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert {p.stem for p in (out / "cells").glob("*.json")} == ids
    assert {
        p.stem: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json") if p.stem in mtimes
    } == mtimes
    again = rows(out)
    assert not [k for k, n in Counter(map(key, again)).items() if n > 1]
    assert quality(out) == quality(local)


def test_failed_cell_is_reported_and_finished_cells_are_kept(tmp_path, monkeypatch):
    base = {"dataset": "cifar10", "data": "embedded", "batch_size": 10, "n_per_domain": 10}
    cells = [Cell(method="source", scenario="continual", corruptions=("gaussian_noise",), **base),
             Cell(method="source", scenario="continual", corruptions=("no_such_corruption",), **base)]  # fmt: skip
    monkeypatch.setitem(suites.SUITES, "broken", Suite("broken", "one bad cell", lambda _a: cells))
    with pytest.raises(errors.TestTimeError, match=r"1 of 2 cells failed on Ray.*no_such_corruption") as e:
        run_suite("broken", SuiteArgs(), tmp_path, ExecOptions(threads=1), jobs=2, backend="ray")
    assert "rerun to resume" in str(e.value)
    assert [p.stem for p in (tmp_path / "broken" / "cells").glob("*.json")] == [cells[0].cell_id]
    assert not ray.is_initialized()


def test_missing_ray_is_a_clear_config_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"pip install 'testtime\[ray\]'"):
        run_suite("tiny", SuiteArgs(), tmp_path, ExecOptions(threads=1), backend="ray")
    assert not (tmp_path / "tiny").exists()  # nothing written
    with pytest.raises(ConfigError, match=r"testtime\[ray\]"):
        ray_backend.run_cells_ray([], ExecOptions(), tmp_path, 1, _console())


def test_speed_suite_and_unknown_backend_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"one process.*--backend local"):
        run_suite("speed", SuiteArgs(methods=["source"]), tmp_path, ExecOptions(), backend="ray")
    with pytest.raises(ConfigError, match=r"unknown backend 'dask'; known: local, ray"):
        run_suite("tiny", SuiteArgs(), tmp_path, ExecOptions(), backend="dask")
    assert not list(tmp_path.iterdir())
    assert main(["bench", "--suite", "speed", "--backend", "ray", "--out", str(tmp_path)]) == 2
    assert "--backend local" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "tiny", "--backend", "dask"])


def test_cli_parses_ray_options(monkeypatch, tmp_path):
    seen = {}

    def fake_run_suite(name, sargs, out, opts, **kw):
        seen.update(kw, name=name)
        d = Path(out) / name
        d.mkdir(parents=True)
        (d / "results.csv").write_text(
            "dataset,method,scenario,corruption,severity,seed,batch_size,metric,value\n"
        )
        return d

    monkeypatch.setattr(suites, "run_suite", fake_run_suite)
    args = ["bench", "--suite", "tiny", "--backend", "ray", "--ray-address", "10.0.0.1:6379", "-j", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert seen == {"name": "tiny", "jobs": 3, "backend": "ray", "ray_address": "10.0.0.1:6379",
                    "console": seen["console"]}  # fmt: skip


def _console():
    from rich.console import Console

    return Console(stderr=True)
