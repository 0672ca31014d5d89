"""Reports never pool cells of different settings: scenario options (e.g. the correlated stream's
delta) and source models are columns of results.csv and split the tables (issue 16)."""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import TINY_RUN
from testtime.bench.report import REQUIRED_COLUMNS, cells_from_rows, load_rows, render
from testtime.cli import main

RUNS = {  # run id: extra arguments
    "d01": ["--scenario", "correlated", "--delta", "0.1"],
    "d001": ["--scenario", "correlated", "--delta", "0.01"],
    "gn": ["--scenario", "correlated", "--delta", "0.01", "--model", "cifar10_resnet26_gn"],
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Three tiny runs (two deltas on the BN model, one on the GN model) with their cells in one folder."""
    root = tmp_path_factory.mktemp("settings")
    cache = root / "cache"
    merged = root / "merged"
    (merged / "cells").mkdir(parents=True)
    for run_id, extra in RUNS.items():
        argv = ["run", *TINY_RUN, *extra, "--out", str(root), "--run-id", run_id, "--cache-dir", str(cache)]
        assert main(argv) == 0
        for cell in (root / run_id / "cells").glob("*.json"):
            shutil.copy(cell, merged / "cells" / cell.name)
    render(merged, plots=False)
    return root, merged


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_records_options_and_model(merged):
    root, _ = merged
    rows = _csv(root / "d001" / "results.csv")
    assert {r["options"] for r in rows} == {"delta=0.01"}
    assert {r["model"] for r in rows} == {"cifar10_resnet26"}  # the dataset's default, named
    assert {r["model"] for r in _csv(root / "gn" / "results.csv")} == {"cifar10_resnet26_gn"}
    trace = _csv(root / "gn" / "trace.csv")
    assert trace and {(t["options"], t["model"]) for t in trace} == {("delta=0.01", "cifar10_resnet26_gn")}


def test_summary_keeps_deltas_and_models_apart(merged):
    _, out = merged
    summary = (out / "summary.md").read_text()
    for heading in (
        "correlated delta=0.1 (batch 25, model cifar10_resnet26)",
        "correlated delta=0.01 (batch 25, model cifar10_resnet26)",
        "correlated delta=0.01 (batch 25, model cifar10_resnet26_gn)",
    ):
        assert f"### error: cifar10 {heading}, severity 5" in summary
        assert f"| source | cifar10 {heading} |" in summary  # the summary table's rows too
    # one seed per setting: no "mean ± std" that would betray pooled cells
    assert "±" not in summary.split("## Summary")[0]


def test_report_from_results_csv_alone_keeps_them_apart(merged, tmp_path):
    _, out = merged
    only = tmp_path / "csv_only"
    only.mkdir()
    for name in ("results.csv", "trace.csv"):
        shutil.copy(out / name, only / name)
    render(only, plots=False)
    assert (only / "summary.md").read_text().count("### error: cifar10 correlated") == 3
    cells = cells_from_rows(load_rows(only), only / "trace.csv")
    assert len(cells) == 3
    assert all(c["trace"] for c in cells)  # each trace found its own run (same method, scenario, seed)


def test_results_csv_without_the_setting_columns_still_loads(merged, tmp_path):
    _, out = merged
    old = tmp_path / "old"
    old.mkdir()
    rows = _csv(out / "results.csv")
    with open(old / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(REQUIRED_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    loaded = load_rows(old)
    assert len(loaded) == len(rows) and {(r["options"], r["model"]) for r in loaded} == {("", "")}
    render(old, plots=False)  # nothing to split on: one pooled table, as before the columns existed
    assert (old / "summary.md").read_text().count("### error: cifar10 correlated") == 1


def test_plot_panels_are_titled_as_the_report_headings(merged):
    """A plot panel and the summary's table for the same setting carry the same words."""
    from testtime.bench.plots import _facets
    from testtime.bench.report import load_cells

    pytest.importorskip("matplotlib")
    _, out = merged
    summary = (out / "summary.md").read_text()
    groups, _ = _facets(load_cells(out))
    assert len(groups) == 3
    for title in groups:
        assert f"### error: {title}\n" in summary
