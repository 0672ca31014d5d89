"""Report plots (matplotlib, optional): error over the stream, per-corruption bars, reliability."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(cell: dict[str, Any]) -> str:
    c = cell["cell"]
    return f"{c['method']} ({c['scenario']})"


def plot_error_over_stream(cells: list[dict[str, Any]], path: Path, window: int = 5) -> Path:
    """Per-batch error (moving average over `window` batches) along the stream, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    seen_boundaries = False
    for cell in cells:
        if cell["cell"]["seed"] != min(c["cell"]["seed"] for c in cells):
            continue
        err = np.array([t["error"] for t in cell["trace"]])
        if len(err) == 0:
            continue
        k = min(window, len(err))
        smooth = np.convolve(err, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=_label(cell), lw=1.2)
        if not seen_boundaries:
            doms = [t["domain"] for t in cell["trace"]]
            for i in range(1, len(doms)):
                if doms[i] != doms[i - 1]:
                    ax.axvline(i, color="0.85", lw=0.6, zorder=0)
            seen_boundaries = True
    ax.set_xlabel("batch")
    ax.set_ylabel(f"error % (moving average, {window} batches)")
    ax.set_title("Error over the test stream (grey lines: domain shifts)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_corruption_bars(cells: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars of error per corruption (mean over seeds), one group per corruption."""
    plt = _plt()
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    corrs: list[str] = []
    for cell in cells:
        for r in cell["rows"]:
            if r["metric"] == "error" and r["corruption"] not in ("all",):
                vals[_label(cell)][r["corruption"]].append(r["value"])
                if r["corruption"] not in corrs:
                    corrs.append(r["corruption"])
    if "mean" in corrs:
        corrs = [c for c in corrs if c != "mean"] + ["mean"]
    labels = list(vals)
    fig, ax = plt.subplots(figsize=(max(8, len(corrs) * 0.9), 4.5))
    w = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ys = [np.mean(vals[lab][c]) if vals[lab][c] else np.nan for c in corrs]
        ax.bar(np.arange(len(corrs)) + i * w - 0.4 + w / 2, ys, w, label=lab)
    ax.set_xticks(np.arange(len(corrs)), [c.replace("_", "\n") for c in corrs], fontsize=7)
    ax.set_ylabel("error %")
    ax.set_title("Error per corruption")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(cells: list[dict[str, Any]], path: Path) -> Path:
    """Reliability diagram (accuracy vs confidence, 15 bins) pooled over each stream."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for cell in cells:
        rel = cell.get("extra", {}).get("reliability")
        if not rel or cell["cell"]["seed"] != min(c["cell"]["seed"] for c in cells):
            continue
        count = np.array(rel["count"])
        m = count > 0
        ax.plot(
            np.array(rel["confidence"])[m], np.array(rel["accuracy"])[m], marker="o", ms=3, label=_label(cell)
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(out_dir: Path, cells: list[dict[str, Any]]) -> list[Path]:
    if not cells:
        return []
    return [
        plot_error_over_stream(cells, out_dir / "error_over_stream.png"),
        plot_corruption_bars(cells, out_dir / "error_per_corruption.png"),
        plot_reliability(cells, out_dir / "reliability.png"),
    ]
