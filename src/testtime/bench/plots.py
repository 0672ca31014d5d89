"""Report plots (matplotlib, optional): error over the stream, per-corruption bars, reliability.

Each figure has one panel per setting (dataset, scenario and its options, batch size, severity, and
the model when the cells hold several); a method keeps
its colour across panels and appears once in the figure legend. Stream plots show the lowest seed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from testtime.bench.report import cell_setting, group_label, heading, several_models


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setting(cell: dict[str, Any], with_model: bool = False) -> str:
    """A panel's title: the report's heading for the same setting."""
    c = cell["cell"]
    row = {**c, **cell_setting(c), "dataset": c.get("dataset", "cifar10")}
    return heading(group_label(row, with_model), {int(c.get("severity") or 0)})


def _facets(cells: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Cells grouped by setting (first-seen order) and a stable colour per method."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    methods: list[str] = []
    with_model = several_models([cell_setting(c["cell"]) for c in cells])
    for cell in cells:
        groups[_setting(cell, with_model)].append(cell)
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


def moving_average(err: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` batches at every batch (fewer at the start), ignoring NaNs
    (batches without a known label): one value per batch, so even a one-batch stream is drawn."""
    out = np.full(len(err), np.nan)
    for i in range(len(err)):
        part = err[max(0, i - window + 1) : i + 1]
        part = part[~np.isnan(part)]
        if len(part):
            out[i] = part.mean()
    return out


def domain_shifts(trace: list[dict[str, Any]], min_run: int = 3) -> list[tuple[int, str]] | None:
    """(batch index, domain) where each segment of the stream starts, or None for a stream that
    mixes domains within its batches (mixed_domains: one segment, while the trace records only each
    batch's first sample's domain). A trace without segments (trace.csv) counts as mixed when
    domains recur in runs shorter than `min_run` batches."""
    doms = [str(t["domain"]) for t in trace]
    if trace and all("segment" in t for t in trace):
        starts = [0] + [i for i in range(1, len(trace)) if trace[i]["segment"] != trace[i - 1]["segment"]]
        if len(starts) == 1 and len(set(doms)) > 1:
            return None
    else:
        starts = [0] + [i for i in range(1, len(doms)) if doms[i] != doms[i - 1]]
        runs = np.diff([*starts, len(doms)])
        if len(starts) > len(set(doms)) and float(np.median(runs)) < min_run:
            return None
    return [(i, doms[i]) for i in starts] if doms else []


def _short(domain: str) -> str:
    name, _, sev = domain.partition("@")
    for suffix in ("_noise", "_blur", "_transform", "_compression"):
        name = name.removesuffix(suffix)
    return f"{name}@{sev}" if sev and sev != "0" else name


MAX_SHIFT_LABELS = 20  # more shifts than this (e.g. long_horizon) are drawn unlabelled


def plot_error_over_stream(cells: list[dict[str, Any]], path: Path, window: int = 5) -> Path:
    """Per-batch error (trailing moving average over up to `window` batches, shrunk for short
    streams) along each stream, one line per method; grey lines where the domain shifts, labelled."""
    from matplotlib.ticker import MaxNLocator

    groups, colours = _facets(cells)
    plt, fig, axes = _figure(len(groups), 6.5, 3.4)
    windows: set[int] = set()
    for ax, (setting, group) in zip(axes, groups.items(), strict=True):
        boundaries_drawn, mixed = False, False
        for cell in _first_seed(group):
            err = np.array([t["error"] for t in cell["trace"]], dtype=float)
            if len(err) == 0:
                continue
            k = max(1, min(window, len(err) // 4))  # at least 4 windows along the stream
            windows.add(k)
            x = np.arange(1, len(err) + 1)
            marker = "o" if len(err) <= 30 else None
            ax.plot(
                x, moving_average(err, k), color=colours[cell["cell"]["method"]], lw=1.1, marker=marker, ms=3
            )
            if not boundaries_drawn:
                shifts = domain_shifts(cell["trace"])
                mixed = shifts is None
                for i, dom in shifts or []:
                    if i > 0:
                        ax.axvline(i + 0.5, color="0.8", lw=0.6, zorder=0)
                    if len(shifts or []) <= MAX_SHIFT_LABELS:
                        ax.text(i + 0.55, 0.98, _short(dom), transform=ax.get_xaxis_transform(), rotation=90,
                                va="top", ha="left", fontsize=6, color="0.45", clip_on=True)  # fmt: skip
                boundaries_drawn = True
        n_batches = max((len(c["trace"]) for c in group), default=0)
        if n_batches:
            ax.set_xlim(0.5, n_batches + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(setting + (" — domains mixed in every batch" if mixed else ""), fontsize=9)
        ax.set_xlabel("batch", fontsize=8)
        ax.set_ylabel("error %", fontsize=8)
    w = "/".join(str(k) for k in sorted(windows)) or str(window)
    avg = "per batch" if windows == {1} else f"{w}-batch moving average"
    return _finish(plt, fig, colours, path, f"Error over the stream ({avg}; grey: domain shifts)")


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
    """Reliability diagrams (accuracy vs confidence, 15 bins) pooled over each stream, one panel per
    setting; below, each method's samples per bin (right axis, log scale) as a step line."""
    groups, colours = _facets(cells)
    plt, fig, axes = _figure(len(groups), 4.6, 3.8)
    for ax, (setting, group) in zip(axes, groups.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        counts = ax.twinx()
        top = 1
        for cell in _first_seed(group):
            rel = cell.get("extra", {}).get("reliability")
            if not rel:
                continue
            colour = colours[cell["cell"]["method"]]
            count = np.array(rel["count"], dtype=float)
            m = count > 0
            conf, acc = np.array(rel["confidence"])[m], np.array(rel["accuracy"])[m]
            ax.plot(conf, acc, marker="o", ms=2.5, lw=1, color=colour)
            edges = np.array(rel.get("edges") or np.linspace(0, 1, len(count) + 1))
            counts.stairs(np.maximum(count, 0.5), edges, color=colour, lw=0.8, alpha=0.6, baseline=0.5)
            top = max(top, int(count.max()))
        counts.set_yscale("log")
        counts.set_ylim(0.5, top**2.5 if top > 1 else 10)  # counts in the lower part of the panel
        counts.set_ylabel("samples per bin (steps, log)", fontsize=7)
        counts.tick_params(labelsize=6)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_title(setting, fontsize=9)
    return _finish(
        plt, fig, colours, path, "Reliability (dashed: perfect calibration; steps: samples per bin)"
    )


def make_plots(out_dir: Path, cells: list[dict[str, Any]]) -> list[Path]:
    if not cells:
        return []
    paths = []
    if any(c.get("trace") for c in cells):
        paths.append(plot_error_over_stream(cells, out_dir / "error_over_stream.png"))
    paths.append(plot_corruption_bars(cells, out_dir / "error_per_corruption.png"))
    if any(c.get("extra", {}).get("reliability") for c in cells):  # not in a results.csv alone
        paths.append(plot_reliability(cells, out_dir / "reliability.png"))
    return paths
