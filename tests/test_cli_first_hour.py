"""What a new user meets first (issue 18): usage, warnings, early errors, reports, tables, help."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import re
import shutil

import numpy as np
import pytest

from conftest import TINY_RUN
from testtime.cli import build_parser, main


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def no_full_cifar(tmp_path, monkeypatch):
    """Pretend the full CIFAR-10 is nowhere to be found (as on a fresh clone)."""
    monkeypatch.setattr("testtime.data.cifar.shared_data_dirs", lambda: [tmp_path / "no-data-here"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny run: (results directory, the cache it corrupted into, its stderr)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = root / "cache"
    assert main(["run", *TINY_RUN, "--out", str(root), "--run-id", "r", "--cache-dir", str(cache)]) == 0
    return root / "r", cache


def test_bare_testtime_prints_usage_instead_of_running(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("usage: testtime") and "run" in out and "report" in out
    assert "testtime run" in err and "corrupting" not in err


@pytest.mark.parametrize(
    ("argv", "prog", "suggestion"),
    [
        (["run", "--n-per-domian", "5"], "testtime run", "--n-per-domain"),
        (["methods", "--verbsoe"], "testtime methods", "--verbose"),
        (["scale", "solve", "2+2", "--temprature", "0.5"], "testtime scale solve", "--temperature"),
    ],
)
def test_unknown_option_lists_the_valid_ones(argv, prog, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"did you mean {suggestion}?" in err
    valid = err.split(f"valid options of `{prog}`:")[1]
    assert suggestion in valid and "--help" in valid


def test_data_auto_without_full_cifar_warns_and_records_it(tiny_run, tmp_path, no_full_cifar, capsys):
    argv = ["run", *TINY_RUN, "--data", "auto", "--out", str(tmp_path), "--run-id", "r"]
    assert main([*argv, "--cache-dir", str(tiny_run[1])]) == 0
    err = _flat(capsys.readouterr().err)
    assert "warning: --data auto: the full CIFAR-10 was not found" in err
    assert "using the 2,000 CIFAR-10 test images shipped in the package" in err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "2,000 CIFAR-10 test images shipped" in cfg["data_fallback"]
    assert cfg["data_description"].startswith("generated from embedded:")


def test_embedded_data_has_no_fallback_warning(tiny_run):
    cfg = json.loads((tiny_run[0] / "config.json").read_text())
    assert "data_fallback" not in cfg


def test_cache_hits_are_not_logged_as_corrupting(tiny_run, tmp_path, capsys):
    _, cache = tiny_run
    assert any(cache.iterdir())
    assert (
        main(["run", *TINY_RUN, "--out", str(tmp_path), "--run-id", "again", "--cache-dir", str(cache)]) == 0
    )
    assert "corrupting" not in capsys.readouterr().err


def test_report_from_results_csv_alone(tiny_run, tmp_path, capsys):
    only = tmp_path / "downloaded"
    only.mkdir()
    shutil.copy(tiny_run[0] / "results.csv", only / "results.csv")
    before = (only / "results.csv").read_text()
    assert main(["report", str(only)]) == 0
    out, err = capsys.readouterr()
    assert "gaussian_noise" in out and "source" in out  # the error table
    summary = (only / "summary.md").read_text()
    assert "| source |" in summary and "rendered from results.csv alone" in summary
    assert (only / "results.csv").read_text() == before  # the input is not rewritten
    assert "from results.csv: summary.md" in _flat(err)
    if importlib.util.find_spec("matplotlib"):
        assert (only / "error_per_corruption.png").stat().st_size > 0
        assert "error_per_corruption.png" in err
        assert not (only / "reliability.png").exists()  # needs cells/


def test_report_from_cells_says_what_it_wrote(tiny_run, capsys):
    assert main(["report", str(tiny_run[0]), "--no-plots"]) == 0
    err = _flat(capsys.readouterr().err)
    assert "from cells/: summary.md, results.csv, trace.csv" in err


def test_report_refuses_a_csv_that_is_not_ours(tmp_path, capsys):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a testtime results CSV (missing column(s) dataset" in capsys.readouterr().err


def test_train_source_names_a_download_function_that_exists(tmp_path, no_full_cifar, capsys):
    assert main(["train-source", "--out", str(tmp_path / "src")]) == 2
    err = capsys.readouterr().err
    from testtime.data.cifar import load_cifar10
    from testtime.errors import DataError

    with pytest.raises(DataError) as e:
        load_cifar10("train")
    for text in (err, str(e.value)):
        named = re.findall(r"(testtime(?:\.\w+)+)\.(\w+)\(", text)
        named += re.findall(r"from (testtime(?:\.\w+)+) import (\w+)", text)
        assert named, text
        for module, func in named:
            assert callable(getattr(importlib.import_module(module), func)), (module, func)
    assert not (tmp_path / "src").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--arch", "resnet99"], "unknown architecture 'resnet99'"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--data", "/does/not/exist"], "does not exist"),
    ],
)
def test_train_source_checks_inputs_first(argv, match, tmp_path, capsys):
    assert main(["train-source", *argv, "--out", str(tmp_path / "src")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "src").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model-path", "MISSING", "--arch", "resnet26"], "weights file not found"),
        (["-s", "correlated", "--delta", "-1"], "delta must be >= 0"),
        (["--corruptions", "gaussian_noise,gausian_blur"], "unknown corruption(s) gausian_blur"),
        (["--model", "robustbench:cifar10:Standard", "--model-path", "MISSING"], "weights file not found"),
    ],
)
def test_run_inputs_fail_before_any_image_is_corrupted(extra, match, tmp_path, capsys):
    extra = [str(tmp_path / "nope.pt") if a == "MISSING" else a for a in extra]
    cache = tmp_path / "cache"
    argv = ["run", "-m", "source", "--n-per-domain", "50", *extra, "--out", str(tmp_path / "res")]
    assert main([*argv, "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert match in err and "corrupting" not in err
    assert not cache.exists() or not any(cache.iterdir())  # nothing generated
    assert not (tmp_path / "res").exists()  # and no results folder


def test_failed_run_leaves_no_results_folder(tmp_path, monkeypatch, capsys):
    from testtime.errors import DataError

    def fail(*args, **kwargs):
        raise DataError("the first cell failed")

    monkeypatch.setattr("testtime.bench.experiment.execute_cell", fail)
    argv = ["run", *TINY_RUN, "--out", str(tmp_path), "--run-id", "r", "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 2
    assert "the first cell failed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_failed_resume_keeps_the_finished_results(tiny_run, tmp_path, monkeypatch):
    from testtime.errors import DataError

    run_dir, cache = tiny_run
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)

    def fail(*args, **kwargs):
        raise DataError("a later cell failed")

    monkeypatch.setattr("testtime.bench.experiment.execute_cell", fail)
    argv = ["run", *TINY_RUN, "-m", "bn", "--out", str(tmp_path), "--run-id", "r", "--cache-dir", str(cache)]
    assert main(argv) == 2
    assert len(list((copy / "cells").glob("*.json"))) == 1 and (copy / "config.json").exists()


def _rows(text: str, start: int) -> dict[str, list[str]]:
    """A rich table's rows keyed by their first column, each column's text with whitespace removed
    (a row spans several lines when values wrap; its first line is the one where column `start`,
    filled on every row, is not empty)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        parts = line.split("│")[1:-1]
        if len(parts) <= start:
            continue
        if parts[start].strip() or not rows:
            rows.append([""] * len(parts))
        for i, p in enumerate(parts):
            rows[-1][i] += "".join(p.split())
    return {r[0]: r for r in rows}


def test_tables_wrap_long_values_instead_of_cutting_them(monkeypatch, capsys):
    from testtime.adapt.config import config_table
    from testtime.adapt.registry import get_method, list_methods

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["methods", "-v"]) == 0
    rows = _rows(capsys.readouterr().out, 2)  # column 2: min batch
    assert set(rows) == set(list_methods())
    for name in list_methods():
        full = "".join(", ".join(f"{n}={d}" for n, _, d in config_table(get_method(name).Config())).split())
        assert rows[name][3] == full, name
    assert not any("…" in r[3] for r in rows.values())

    assert main(["models"]) == 0
    lines = [line.split("│") for line in capsys.readouterr().out.splitlines()]
    names = "".join(p[1].strip() for p in lines if len(p) == 4)  # the published models' name column
    for model in (
        "robustbench:cifar10:Hendrycks2020AugMix_ResNeXt",
        "robustbench:cifar10:Hendrycks2020AugMix_WRN",
        "robustbench:cifar100:Hendrycks2020AugMix_ResNeXt",
    ):
        assert model in names


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["run", "train-source", "bench", "serve-check", "report"])
def test_help_states_each_default_once(command):
    parser = _subparser(command)
    text = parser.format_help()
    assert "(default: None)" not in text
    assert not re.search(r"\(default[^()]*\)\s*\(default", _flat(text))
    formatter = parser._get_formatter()
    for action in parser._actions:
        d = action.default
        if action.option_strings and d is not None and d is not False and d != argparse.SUPPRESS:
            assert "default" in formatter._get_help_string(action), action.option_strings  # stated once


@pytest.mark.parametrize("command", ["run", "train-source", "report"])
def test_every_option_has_help(command):
    for action in _subparser(command)._actions:
        assert action.help, action.option_strings or action.dest


def test_bench_n_per_domain_shrinks_a_suite(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TESTTIME_DATA", str(data_dir))
    argv = ["bench", "--suite", "digits", "-m", "source", "--seed", "0", "--n-per-domain", "20"]
    assert main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    out = tmp_path / "digits_n20"
    rows = list(csv.DictReader((out / "results.csv").open()))
    images = {r["dataset"]: float(r["value"]) for r in rows if r["metric"] == "n_images"}
    assert images == {"mnist_usps": 20.0, "usps_mnist": 20.0}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["identity"] == {"suite": "digits", "data": "auto", "n_per_domain": 20}


def test_stream_plot_helpers_short_and_mixed_streams():
    from testtime.bench.plots import domain_shifts, moving_average

    smooth = moving_average(np.array([10.0, 20.0, np.nan]), 5)
    assert smooth.tolist() == [10.0, 15.0, 15.0]  # one value per batch, even for 3 batches
    continual = [{"segment": s, "domain": d} for s, d in [(0, "a@5"), (0, "a@5"), (1, "b@5"), (1, "b@5")]]
    assert domain_shifts(continual) == [(0, "a@5"), (2, "b@5")]
    one_batch_each = [{"segment": i, "domain": d} for i, d in enumerate("abc")]
    assert domain_shifts(one_batch_each) == [(0, "a"), (1, "b"), (2, "c")]
    mixed = [{"segment": 0, "domain": d} for d in "abcabca"]
    assert domain_shifts(mixed) is None
    assert domain_shifts([{"domain": d} for d in "abcabcab"]) is None  # trace.csv: no segments


def test_plots_of_a_two_batch_run_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from testtime.bench.plots import make_plots

    trace = [{"batch": 0, "segment": 0, "domain": "gaussian_noise@5", "n": 25, "error": 40.0},
             {"batch": 1, "segment": 1, "domain": "contrast@5", "n": 25, "error": 60.0}]  # fmt: skip
    rel = {
        "count": [0] * 13 + [10, 40],
        "confidence": [0] * 13 + [0.9, 0.97],
        "accuracy": [0] * 13 + [0.5, 0.8],
    }
    cell = {
        "cell": {"dataset": "cifar10", "method": "tent", "scenario": "continual", "seed": 0, "batch_size": 25,
                 "severity": 5},
        "rows": [{"metric": "error", "corruption": "gaussian_noise", "value": 40.0}],
        "trace": trace,
        "extra": {"reliability": rel},
    }  # fmt: skip
    paths = make_plots(tmp_path, [cell])
    assert [p.name for p in paths] == ["error_over_stream.png", "error_per_corruption.png", "reliability.png"]
    img = matplotlib.image.imread(paths[0])[..., :3]
    blue = (np.abs(img - np.array([0.12, 0.47, 0.71])).sum(-1) < 0.1).sum()  # tab:blue, the method's line
    assert blue > 200  # the line is drawn (a 2-batch stream used to give an empty panel)


def test_train_source_refuses_another_configurations_checkpoint(tmp_path):
    import torch

    from testtime.errors import ConfigError
    from testtime.models.train import TrainConfig, train_source

    torch.save(
        {"model": {"w": torch.zeros(1)}, "opt": {}, "gen": None, "epoch": 1, "log": "[]"},
        tmp_path / "checkpoint.pt",
    )
    x = np.zeros((8, 32, 32, 3), np.uint8)
    with pytest.raises(ConfigError, match="cannot resume from this checkpoint"):
        train_source(TrainConfig(arch="resnet20", epochs=1, batch_size=4), (x, np.zeros(8)), None, tmp_path)


@pytest.mark.parametrize("load", [0.2, 1.4, 9.0])
def test_auto_threads_is_half_the_cores_whatever_the_load(load, monkeypatch):
    import os

    import torch

    from testtime.device import auto_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    cores = torch.get_num_threads()
    assert auto_threads() == max(1, cores // 2)  # deterministic: the load does not change it
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
    assert auto_threads() == cores  # the user's choice wins
