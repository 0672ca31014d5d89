"""Report plots (matplotlib, optional): error over the stream, per-corruption bars, reliability.

Each figure has one panel per setting (dataset, scenario, batch size, severity); a method keeps
its colour across panels and appears once in the figure legend. Stream plots show the lowest seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setting(cell: dict[str, Any]) -> str:
    c = cell["cell"]
    sev = (
        f", severity {c['severity']}"
        if c.get("dataset", "cifar10") == "cifar10" and c.get("severity")
        else ""
    )
    return f"{c.get('dataset', 'cifar10')} {c['scenario']} (batch {c['batch_size']}{sev})"


def _facets(cells: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Cells grouped by setting (first-seen order) and a stable colour per method."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    methods: list[str] = []
    for cell in cells:
        groups[_setting(cell)].append(cell)
        if cell["cell"]["method"] not in methods:
            methods.append(cell["cell"]["method"])
    plt = _plt()
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    return dict(groups), colours


def _figure(n: int, panel_w: float, panel_h: float):
    plt = _plt()
    ncol = min(n, 2)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(panel_w * ncol + 1.8, panel_h * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _finish(plt, fig, colours: dict[str, Any], path: Path, title: str) -> Path:
    handles = [plt.Line2D([], [], color=c, lw=2) for c in colours.values()]
    fig.legend(handles, list(colours), loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _first_seed(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    s = min(c["cell"]["seed"] for c in cells)
    return [c for c in cells if c["cell"]["seed"] == s]


def plot_error_over_stream(cells: list[dict[str, Any]], path: Path, window: int = 5) -> Path:
    """Per-batch error (moving average over `window` batches) along each stream, one line per method."""
    groups, colours = _facets(cells)
    plt, fig, axes = _figure(len(groups), 6.5, 3.4)
    for ax, (setting, group) in zip(axes, groups.items(), strict=True):
        boundaries_drawn = False
        for cell in _first_seed(group):
            err = np.array([t["error"] for t in cell["trace"]])
            if len(err) == 0:
                continue
            k = min(window, len(err))
            smooth = np.convolve(err, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k - 1, smooth, color=colours[cell["cell"]["method"]], lw=1.1)
            if not boundaries_drawn:
                doms = [t["domain"] for t in cell["trace"]]
                for i in range(1, len(doms)):
                    if doms[i] != doms[i - 1]:
                        ax.axvline(i, color="0.88", lw=0.6, zorder=0)
                boundaries_drawn = True
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("batch", fontsize=8)
        ax.set_ylabel("error %", fontsize=8)
    return _finish(
        plt, fig, colours, path, f"Error over the stream ({window}-batch moving average; grey: domain shifts)"
    )


def plot_corruption_bars(cells: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars of error per corruption (mean over seeds), one panel per setting."""
    groups, colours = _facets(cells)
    ncorr = max(len({r["corruption"] for c in g for r in c["rows"]}) for g in groups.values())
    plt, fig, axes = _figure(len(groups), max(5.0, 0.55 * ncorr), 3.4)
    for ax, (setting, group) in zip(axes, groups.items(), strict=True):
        vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        corrs: list[str] = []
        for cell in group:
            for r in cell["rows"]:
                if r["metric"] == "error" and r["corruption"] != "all":
                    vals[cell["cell"]["method"]][r["corruption"]].append(r["value"])
                    if r["corruption"] not in corrs:
                        corrs.append(r["corruption"])
        if "mean" in corrs:
            corrs = [c for c in corrs if c != "mean"] + ["mean"]
        w = 0.8 / max(1, len(vals))
        for i, (method, per) in enumerate(vals.items()):
            ys = [np.mean(per[c]) if per[c] else np.nan for c in corrs]
            ax.bar(np.arange(len(corrs)) + i * w - 0.4 + w / 2, ys, w, color=colours[method])
        ax.set_xticks(np.arange(len(corrs)), [c.split("_")[0] for c in corrs], fontsize=7, rotation=60)
        ax.set_ylabel("error %", fontsize=8)
        ax.set_title(setting, fontsize=9)
    return _finish(plt, fig, colours, path, "Error per corruption (mean over seeds)")


def plot_reliability(cells: list[dict[str, Any]], path: Path) -> Path:
    """Reliability diagrams (accuracy vs confidence, 15 bins) pooled over each stream, one panel per setting."""
    groups, colours = _facets(cells)
    plt, fig, axes = _figure(len(groups), 4.2, 3.8)
    for ax, (setting, group) in zip(axes, groups.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        for cell in _first_seed(group):
            rel = cell.get("extra", {}).get("reliability")
            if not rel:
                continue
            m = np.array(rel["count"]) > 0
            conf, acc = np.array(rel["confidence"])[m], np.array(rel["accuracy"])[m]
            ax.plot(conf, acc, marker="o", ms=2.5, lw=1, color=colours[cell["cell"]["method"]])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(setting, fontsize=9)
    return _finish(plt, fig, colours, path, "Reliability (dashed: perfect calibration)")


def make_plots(out_dir: Path, cells: list[dict[str, Any]]) -> list[Path]:
    if not cells:
        return []
    return [
        plot_error_over_stream(cells, out_dir / "error_over_stream.png"),
        plot_corruption_bars(cells, out_dir / "error_per_corruption.png"),
        plot_reliability(cells, out_dir / "reliability.png"),
    ]
