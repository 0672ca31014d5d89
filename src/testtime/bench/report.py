"""Render tidy CSV, traces and markdown tables from a results directory's cell files."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from testtime.errors import DataError
from testtime.models.zoo import cell_model_name
from testtime.precision import precision_label
from testtime.utils import atomic_write_text

REQUIRED_COLUMNS = (
    "dataset",
    "method",
    "scenario",
    "corruption",
    "severity",
    "seed",
    "batch_size",
    "metric",
    "value",
)
# options: the scenario's options (e.g. "delta=0.01"); model: the source model (name or weights file).
# A results.csv written before these existed still loads (they read as "").
SETTING_COLUMNS = ("options", "model")
TIDY_COLUMNS = (*REQUIRED_COLUMNS, *SETTING_COLUMNS)


def cell_setting(cell: dict[str, Any]) -> dict[str, str]:
    """The `options` and `model` of a cell (its `asdict` or its JSON), as the tidy rows record them."""
    if "options" in cell:  # a record rebuilt from tidy rows (cells_from_rows)
        return {"options": str(cell["options"] or ""), "model": str(cell.get("model") or "")}
    opts = cell.get("scenario_options") or ()
    pairs = sorted(opts.items() if isinstance(opts, dict) else (tuple(p) for p in opts))
    model = cell.get("model_path") or cell_model_name(cell.get("dataset", "cifar10"), cell.get("model"))
    return {"options": " ".join(f"{k}={v}" for k, v in pairs), "model": str(model)}


def load_cells(out_dir: Path) -> list[dict[str, Any]]:
    cells_dir = Path(out_dir) / "cells"
    if not cells_dir.is_dir():
        raise DataError(f"{out_dir}: no results here (missing cells/ directory)")
    cells = []
    for p in sorted(cells_dir.glob("*.json")):
        try:
            cell = json.loads(p.read_text())
            setting = cell_setting(cell["cell"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{p}: unreadable result file ({e!r})") from e
        for r in cell.get("rows", []):  # cells written before rows carried their setting
            for k, v in setting.items():
                r.setdefault(k, v)
        cells.append(cell)
    order: list[str] = []
    cfg_path = Path(out_dir) / "config.json"
    if cfg_path.exists():
        order = json.loads(cfg_path.read_text()).get("methods", [])
    rank = {m: i for i, m in enumerate(order)}
    cells.sort(
        key=lambda c: (c["cell"]["scenario"], c["cell"]["seed"], rank.get(c["cell"]["method"], len(rank)))
    )
    return cells


def load_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Rows of the tidy results CSV (rendered from cells, or read from results.csv)."""
    out_dir = Path(out_dir)
    if (out_dir / "cells").is_dir():
        return [r for c in load_cells(out_dir) for r in c["rows"]]
    csv_path = out_dir / "results.csv"
    if not csv_path.exists():
        raise DataError(f"{out_dir}: neither cells/ nor results.csv found")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{csv_path}: not a testtime results CSV (missing column(s) {', '.join(missing)})"
            )
        rows = list(reader)
    try:
        for r in rows:
            for k in SETTING_COLUMNS:
                r[k] = r.get(k) or ""
            r["value"] = float(r["value"])
            r["severity"], r["seed"], r["batch_size"] = (
                int(r["severity"]),
                int(r["seed"]),
                int(r["batch_size"]),
            )
    except (TypeError, ValueError) as e:
        raise DataError(f"{csv_path}: malformed row {r} ({e})") from e
    return rows


def cells_from_rows(rows: list[dict[str, Any]], trace_path: Path | None = None) -> list[dict[str, Any]]:
    """Cell-like records (as in cells/) rebuilt from tidy rows, for reports from a results.csv alone;
    with `trace_path` (a trace.csv), each gets its per-batch errors where the CSV identifies it."""
    fields = ("dataset", "method", "scenario", "seed", "batch_size", "options", "model")
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        key = tuple(r.get(k, "") for k in fields)
        if key not in groups:
            cell = dict(zip(fields, key, strict=True))
            groups[key] = {"cell": {**cell, "severity": r["severity"]}, "rows": [], "trace": [], "extra": {}}
        groups[key]["rows"].append(r)
        if r["corruption"] == "mean":
            groups[key]["cell"]["severity"] = r["severity"]
    if trace_path is not None and trace_path.is_file():
        by_run: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        for k, c in groups.items():
            by_run[(k[1], k[2], k[3], k[5], k[6])].append(c)
        with open(trace_path, newline="") as f:
            for t in csv.DictReader(f):
                key = (t.get("method", ""), t.get("scenario", ""), int(t.get("seed") or 0))
                match = by_run.get((*key, t.get("options", ""), t.get("model", "")), [])
                if not match and "model" not in t:  # a trace.csv from before the setting columns
                    match = [c for k, cs in by_run.items() if k[:3] == key for c in cs]
                if len(match) == 1:  # trace.csv has no dataset/batch column: only unambiguous runs
                    match[0]["trace"].append({"domain": t["domain"], "error": float(t["error"])})
    return list(groups.values())


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def mean_std(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def several_models(rows: list[dict[str, Any]]) -> bool:
    return len({r.get("model", "") for r in rows}) > 1


def group_label(r: dict[str, Any], with_model: bool = False) -> str:
    """The setting a row belongs to: rows of different scenario options (e.g. delta) or, when the
    report holds several (`with_model`), different models are never pooled."""
    ds = r.get("dataset", "")
    opts = f" {r['options']}" if r.get("options") else ""
    model = f", model {r.get('model') or '?'}" if with_model else ""
    return f"{ds + ' ' if ds else ''}{r['scenario']}{opts} (batch {r['batch_size']}{model})"


def heading(label: str, severities: set[int]) -> str:
    """A setting's title (report headings, plot panels): its `group_label`, and its severity where
    the setting has one nonzero severity."""
    sev = next(iter(severities)) if len(severities) == 1 else 0
    return f"{label}, severity {sev}" if sev else label


def error_table(rows: list[dict[str, Any]], metric: str = "error") -> list[str]:
    """Markdown: one table per dataset/scenario, methods x domains (+ mean), mean ± std over seeds."""
    by: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    methods: dict[str, list[str]] = defaultdict(list)
    cols: dict[str, list[str]] = defaultdict(list)
    sevs: dict[str, set[int]] = defaultdict(set)
    rows = [r for r in rows if r["metric"] == metric and r["corruption"] != "all"]
    with_model = several_models(rows)
    for r in rows:
        if r["corruption"] != "mean":
            sevs[group_label(r, with_model)].add(int(r["severity"]))
    for r in rows:
        g = group_label(r, with_model)
        col = r["corruption"]
        if col != "mean" and len(sevs[g]) > 1:
            col = f"{col}@{r['severity']}"
        if r["method"] not in methods[g]:
            methods[g].append(r["method"])
        if col not in cols[g] and col != "mean":
            cols[g].append(col)
        by[(g, r["method"], col)].append(float(r["value"]))
    lines = []
    for g, ms in methods.items():
        corrs = [*cols[g], "mean"]
        short = [
            c.replace("_noise", "").replace("_blur", "").replace("_transform", "").replace("_compression", "")
            for c in corrs
        ]
        lines += [
            f"### {metric}: {heading(g, sevs[g])}",
            "",
            "| method | " + " | ".join(short) + " |",
            "|---|" + "---:|" * len(corrs),
        ]
        for m in ms:
            vals = [mean_std(by.get((g, m, c), [])) for c in corrs]
            vals[-1] = f"**{vals[-1]}**"
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
    return lines


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: per method and scenario, mean error/NLL/ECE/Brier and cost."""
    cols = [
        ("error", "mean", "error %", 1),
        ("nll", "mean", "NLL", 3),
        ("ece", "mean", "ECE %", 1),
        ("brier", "mean", "Brier", 3),
        ("images_per_s", "all", "img/s", 0),
        ("forward_per_image", "all", "fwd/img", 2),
        ("backward_per_image", "all", "bwd/img", 2),
        ("resets", "all", "resets", 0),
        ("n_skipped_updates", "all", "skipped", 0),
        ("n_restores", "all", "restores", 0),
    ]
    by: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    with_model = several_models(rows)
    for r in rows:
        if r["corruption"] not in ("mean", "all"):
            continue
        k = (r["method"], group_label(r, with_model))
        if k not in order:
            order.append(k)
        by[(*k, f"{r['metric']}|{r['corruption']}")].append(float(r["value"]))
    lines = [
        "| method | scenario | " + " | ".join(c[2] for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for m, s in order:
        vals = [mean_std(by.get((m, s, f"{c[0]}|{c[1]}"), []), c[3]) for c in cols]
        lines.append(f"| {m} | {s} | " + " | ".join(vals) + " |")
    return lines


SPEED_METRICS = (
    "n_images", "images_per_s", "x_inference", "forward_per_image", "min_forward_per_image",
    "backward_per_image", "min_backward_per_image", "adapted_params", "state_bytes", "optimizer_bytes",
    "guard_bytes", "snapshot_bytes", "peak_cuda_mb", "inference_images_per_s", "setup_seconds",
    "loadavg_1m", "torch_threads", "compile_warmup_seconds", "bf16", "amp_requested",
)  # fmt: skip


def speed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method (in row order, averaged over seeds): the cost metrics of the speed suite."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] in SPEED_METRICS and r["corruption"] == "all":
            by[r["method"]][r["metric"]].append(float(r["value"]))
        elif r["metric"] == "error" and r["corruption"] == "mean":
            by[r["method"]]["error"].append(float(r["value"]))
        if r["metric"] == "x_inference":
            by[r["method"]]["batch_size"].append(float(r["batch_size"]))
    return [
        {"method": m, **{k: float(np.mean(v)) for k, v in metrics.items()}}
        for m, metrics in by.items()
        if "x_inference" in metrics
    ]


def speed_table(rows: list[dict[str, Any]], precision: dict[str, Any] | None = None) -> list[str]:
    """Markdown: the speed suite's cost per method, passes measured / declared minimum, and notes;
    `precision`: the run's bf16 detection (testtime.precision.precision_record), stated below."""
    summary = speed_summary(rows)
    if not summary:
        return []
    cuda = any("peak_cuda_mb" in s for s in summary)
    compiled = any("compile_warmup_seconds" in s for s in summary)
    head = ["method", "images", "batch", "img/s", "x inference", "precision", "fwd/img (min)", "bwd/img (min)",
            "adapted params", "state MB", "guard MB", *(["peak CUDA MB"] if cuda else []),
            *(["compile pass s"] if compiled else []), "error %"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def get(s: dict[str, Any], k: str, digits: int) -> str:
        return fmt(s.get(k, float("nan")), digits)

    for s in summary:
        mb = (s.get("state_bytes", 0) + s.get("optimizer_bytes", 0)) / 1e6
        cells = [
            s["method"],
            get(s, "n_images", 0),
            get(s, "batch_size", 0),
            get(s, "images_per_s", 0),
            f"{get(s, 'x_inference', 2)}x",
            precision_label(s.get("bf16"), s.get("amp_requested")),
            f"{get(s, 'forward_per_image', 2)} ({get(s, 'min_forward_per_image', 2)})",
            f"{get(s, 'backward_per_image', 2)} ({get(s, 'min_backward_per_image', 2)})",
            f"{s.get('adapted_params', 0):,.0f}",
            fmt(mb, 3),
            fmt(s.get("guard_bytes", 0) / 1e6, 2),
            *([get(s, "peak_cuda_mb", 0)] if cuda else []),
            *([get(s, "compile_warmup_seconds", 1)] if compiled else []),
            get(s, "error", 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    loads = [s["loadavg_1m"] for s in summary if "loadavg_1m" in s]
    threads = sorted({int(s["torch_threads"]) for s in summary if "torch_threads" in s})
    lines += [
        "",
        "- x inference: the method's wall time over that of plain inference (`eval()`, inference mode) "
        "of the same model on the same batches, timed right before and right after it (mean); robust to "
        "machine load.",
        "- precision: what the method's passes ran in (fp32, or bf16 autocast), with the `amp` setting "
        "when it is not plainly that: auto, forced (`bf16!`), or `bf16` asked where bf16 is slow (float32 "
        "ran instead)."
        + (f" This machine: {precision['summary']}." if precision and precision.get("summary") else ""),
        "- fwd/img, bwd/img: image passes per test image, measured (minimum the algorithm needs).",
        "- state MB: tensors the method keeps besides the adapted model's weights (teachers, anchors, "
        "memories, statistics) plus optimiser state; guard MB: the collapse guard's source copy; "
        "the reset snapshot (the whole state again) is in the JSON. "
        + ("Peak CUDA MB: max_memory_allocated." if cuda else "CPU run: memory as tensor bytes, no peak."),
    ]
    if compiled:
        lines.append(
            "- compile pass s: the untimed first pass over the stream that compiles the method's graphs "
            "(torch.compile); the method is then reset and timed."
        )
    if loads:
        lines.append(
            f"- load average (1 min) at the methods' starts: {min(loads):.2f} to {max(loads):.2f}; "
            f"torch threads: {', '.join(map(str, threads))}."
        )
    return lines


NOT_RECORDED = "the machine of `versions` (cells that predate per-cell devices)"


def device_lines(cells: list[dict[str, Any]]) -> list[str]:
    """Where the cells ran, when they record it (cells written before that was recorded say nothing)."""
    where: dict[str, set[str]] = {}
    for c in cells:
        extra = c.get("extra", {})
        key = f"{extra['device']}, torch {extra.get('torch', '?')}" if "device" in extra else NOT_RECORDED
        where.setdefault(key, set()).add(c["cell"]["method"])
    if set(where) <= {NOT_RECORDED}:
        return []
    return [f"- ran on {k}: {', '.join(sorted(v))}" for k, v in sorted(where.items())]


def render(out_dir: str | Path, plots: bool = True) -> Path:
    """(Re)write results.csv, trace.csv and summary.md (and plots when matplotlib is present)."""
    return render_files(out_dir, plots)[0]


def render_files(out_dir: str | Path, plots: bool = True) -> list[Path]:
    """`render`, returning every file written (summary.md first).

    From cells/ (what `run` and `bench` write): results.csv, trace.csv, summary.md and the plots.
    From a results.csv alone (no cells/): summary.md and the plots the tidy rows allow (the error
    per corruption; the error over the stream too when a trace.csv is there); the CSV is not rewritten.
    """
    out_dir = Path(out_dir)
    from_csv = not (out_dir / "cells").is_dir() and (out_dir / "results.csv").is_file()
    written: list[Path] = []
    if from_csv:
        rows = load_rows(out_dir)
        cells = cells_from_rows(rows, out_dir / "trace.csv")
    else:
        cells = load_cells(out_dir)
        rows = [r for c in cells for r in c["rows"]]
        atomic_write_text(out_dir / "results.csv", _csv(rows, TIDY_COLUMNS))
        trace_rows = [
            {
                "method": c["cell"]["method"],
                "scenario": c["cell"]["scenario"],
                "seed": c["cell"]["seed"],
                **cell_setting(c["cell"]),
                **t,
            }
            for c in cells
            for t in c["trace"]
        ]
        trace_columns = ("method", "scenario", "seed", "options", "model", "batch", "domain", "n", "error")
        atomic_write_text(out_dir / "trace.csv", _csv(trace_rows, trace_columns))
        written += [out_dir / "results.csv", out_dir / "trace.csv"]
    config = {}
    if (out_dir / "config.json").exists():
        config = json.loads((out_dir / "config.json").read_text())
    lines = [f"# testtime results: {out_dir.name}", ""]
    if config:
        if config.get("description"):
            lines += [" ".join(str(config["description"]).split()), ""]
        lines += [
            f"- data: {config.get('data_description', '')}",
            f"- model: {config.get('model', '')}; seed(s): {config.get('seeds', config.get('seed'))}",
            f"- versions: {json.dumps(config.get('env', {}))}",
            *device_lines(cells),
            "",
        ]
    if from_csv:
        lines += ["(rendered from results.csv alone: no per-cell files, so no reliability diagram)", ""]
    lines += [
        "## Error (%) per corruption",
        "",
        *error_table(rows),
        "## Summary",
        "",
        *summary_table(rows),
        "",
    ]
    speed = speed_table(rows, config.get("precision"))
    if speed:
        lines += ["## Speed", "", *speed, ""]
    if any(r["metric"] == "round_error" for r in rows):
        lines += ["## Error (%) per round of the repeated sequence", "", *error_table(rows, "round_error")]
    if plots:
        try:
            from testtime.bench.plots import make_plots

            for p in make_plots(out_dir, cells):
                lines.append(f"![{p.stem}]({p.name})")
                written.append(p)
        except ImportError:
            lines.append("(plots skipped: matplotlib is not installed)")
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    return [out_dir / "summary.md", *written]
