"""The `testtime` command line: runs, listings, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from testtime.cli import main

SMALL = ["--corruptions", "gaussian_noise,contrast", "--n-per-domain", "100", "--batch-size", "50"]


def test_run_small_writes_results(tmp_path, capsys):
    rc = main(
        [
            "run",
            "-m",
            "source,bn,tent",
            *SMALL,
            "--out",
            str(tmp_path),
            "--run-id",
            "r1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    out = tmp_path / "r1"
    for f in ("config.json", "results.csv", "summary.md", "trace.csv"):
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["seeds"] == [0] and cfg["env"]["torch"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"source", "bn", "tent"}
    err = {
        r["method"]: float(r["value"]) for r in rows if r["metric"] == "error" and r["corruption"] == "mean"
    }
    assert err["bn"] < err["source"]
    metrics = {r["metric"] for r in rows}
    assert {
        "error",
        "nll",
        "ece",
        "brier",
        "images_per_s",
        "forward_per_image",
        "backward_per_image",
    } <= metrics
    trace = list(csv.DictReader((out / "trace.csv").open()))
    assert len(trace) == 3 * 4  # 3 methods x 200 images / 50
    assert "| tent |" in (out / "summary.md").read_text()
    assert "source" in capsys.readouterr().out


def test_run_resumes_and_skips_done_cells(tmp_path, capsys):
    args = [
        "run",
        "-m",
        "source",
        *SMALL,
        "--out",
        str(tmp_path),
        "--run-id",
        "r",
        "--cache-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    cell = next((tmp_path / "r" / "cells").glob("*.json"))
    mtime = cell.stat().st_mtime_ns
    assert main(args) == 0
    assert cell.stat().st_mtime_ns == mtime
    assert "already done" in capsys.readouterr().err
    # a different configuration may not be mixed into the same directory
    assert main([*args, "--severity", "3"]) == 2


def test_report_rerenders(tmp_path):
    assert (
        main(
            [
                "run",
                "-m",
                "source",
                *SMALL,
                "--out",
                str(tmp_path),
                "--run-id",
                "r",
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (tmp_path / "r" / "summary.md").unlink()
    assert main(["report", str(tmp_path / "r"), "--no-plots"]) == 0
    assert (tmp_path / "r" / "summary.md").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["run", "-m", "nope"], "unknown method 'nope'"),
        (["run", "--scenario", "nope"], "unknown scenario"),
        (["run", "--data", "/does/not/exist.npz"], "does not exist"),
        (["run", "-o", "lr"], "key=value"),
        (["run", "-m", "source", "-o", "lr=0.1"], "belong to none of the methods"),
        (["run", "--model", "nope"], "unknown model"),
        (["run", "--device", "cuda:99" if not __import__("torch").cuda.is_available() else "nope"], "device"),
        (["report", "/does/not/exist"], "no results here"),
    ],
)
def test_errors_are_one_line_exit_2(args, match, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and err.startswith("testtime: error:")


def test_malformed_npz_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, foo=np.zeros(3))
    assert main(["run", "--data", str(bad)]) == 2
    assert "malformed CIFAR-10 npz" in capsys.readouterr().err


def test_listings(capsys):
    for cmd in (["methods"], ["methods", "-v"], ["scenarios"], ["models"]):
        assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "tent" in out and "continual" in out and "cifar10_resnet26" in out


def test_console_script_help():
    for sub in ([], ["run"], ["methods"], ["train-source"], ["report"]):
        r = subprocess.run(
            [sys.executable, "-m", "testtime.cli", *sub, "--help"], capture_output=True, text=True
        )
        assert r.returncode == 0 and "usage: testtime" in r.stdout


def test_run_default_records_the_recipe_it_resolves_to(tmp_path):
    rc = main(
        ["run", "-m", "default", "--corruptions", "contrast", "--n-per-domain", "100", "--batch-size", "50",
         "--out", str(tmp_path), "--run-id", "d", "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "d" / "results.csv").open()))
    assert {r["method"] for r in rows} == {"auto"}


def test_threads_times_jobs_above_the_cores_warns(monkeypatch):
    """--threads is per worker: more threads than cores in all is named, with the count to give."""
    from rich.console import Console

    from testtime.cli import _threads

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    console = Console(record=True, width=200)
    assert _threads(2, console, jobs=2) == 2
    text = console.export_text()
    assert "4 threads on 2 cores" in text and "--threads 1" in text
    quiet = Console(record=True, width=200)
    assert _threads(1, quiet, jobs=2) == 1 and "oversubscribed" not in quiet.export_text()
