"""Markdown tables of the `archs` suite (issue 16) from the cell files, beside the BN ResNet-26.

    python benchmarks/archs/table.py [RESULTS_DIR]   # default: this folder
    python benchmarks/archs/table.py --write         # also rewrite the tables in the READMEs

Per shipped non-BatchNorm model, the error (%) of every method that ran in each setting (seed 0,
mean over the 15 corruptions), with the collapse-guard restores in brackets where there were any,
and beside it the BatchNorm ResNet-26 on the same protocol (full 10k, severity 5, batch 200, seed
0) where that cell exists: continual from `cifar10c_paper/` and `default_vs_zoo/`, mixed_domains
and correlated delta 0.1 from `default_vs_zoo/`. Then, per scenario, how the ranking of the
methods that ran on both models compares (Spearman's rho over those methods, and the best three on
each), the same for the GN model against the ViT, and one table across all three models: each
method's error minus the source's on the same model and setting, with its count of wins over the
source per model. Nothing is typed in by hand: every number is read from cell files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from testtime.adapt.components.norm_types import BN, SHORT
from testtime.bench.suites import ARCH_MODELS, MEMO_SUBSET
from testtime.data.corruptions import CORRUPTIONS
from testtime.data.streams import DEFAULT_DELTA
from testtime.models.zoo import cell_model_name

HERE = Path(__file__).resolve().parent
BN_DIRS = (
    HERE.parent / "cifar10c_paper",
    HERE.parent / "default_vs_zoo",
    HERE.parent / "cifar10c_memo_subset",
)
BN_MODEL = cell_model_name("cifar10", None)
# (column title, scenario, delta option or None); the delta-0.01 column shows only where cells exist
SETTINGS = (
    ("continual", "continual", None),
    ("mixed_domains", "mixed_domains", None),
    (f"correlated δ={DEFAULT_DELTA}", "correlated", str(DEFAULT_DELTA)),
    ("sorted by label (δ=0)", "correlated", "0.0"),
    ("correlated δ=0.01", "correlated", "0.01"),
)
BN_SETTINGS = SETTINGS[:3]  # the BN model's full-10k cells cover these three
CROSS_TITLE = "Every model: error minus the source's (points; negative = better than no adaptation)"
# MEMO (stateless per image) runs continual on MEMO_SUBSET images per corruption, beside the source
# on the same images: rows of their own ("memo (7,500 images)"), the same experiment in every column
SUBSET_TAG = f" ({len(CORRUPTIONS) * MEMO_SUBSET:,} images)"


def _setting(cell: dict) -> tuple[str, str, str | None] | None:
    opts = dict(map(tuple, cell["scenario_options"]))
    if cell.get("n_per_domain") == MEMO_SUBSET and cell["scenario"] == "continual":
        cell = {**cell, "n_per_domain": None}  # the MEMO subset protocol: rows of their own (see load)
    if cell["batch_size"] != 200 or cell["severity"] != 5 or cell.get("n_per_domain") or cell["overrides"]:
        return None
    if cell["dataset"] != "cifar10" or cell.get("model_path") or cell.get("subset"):
        return None
    delta = opts.get("delta")
    if cell["scenario"] == "correlated" and delta is None:
        delta = str(DEFAULT_DELTA)  # the scenario's default
    for s in SETTINGS:
        if (cell["scenario"], delta) == s[1:]:
            return s
    return None


def load(dirs: list[Path]) -> dict[tuple[str, str, str], tuple[float, int]]:
    """(model, setting title, method) -> (mean error, collapse-guard restores), seed-0 cells."""
    out: dict[tuple[str, str, str], tuple[float, int]] = {}
    for d in dirs:
        for f in sorted((d / "cells").glob("*.json")):
            payload = json.loads(f.read_text())
            cell = payload["cell"]
            setting = _setting(cell)
            if setting is None or int(cell["seed"]) != 0:
                continue
            mean = {
                r["metric"]: float(r["value"]) for r in payload["rows"] if r["corruption"] in ("mean", "all")
            }
            if "error" not in mean:
                continue
            model = cell_model_name("cifar10", cell.get("model"))
            method = cell["method"] + (SUBSET_TAG if cell.get("n_per_domain") else "")
            out[(model, setting[0], method)] = (mean["error"], int(mean.get("n_restores", 0)))
    return out


def _fmt(v: tuple[float, int] | None) -> str:
    if v is None:
        return "·"
    return f"{v[0]:.1f}" + (f" [{v[1]}]" if v[1] else "")


def model_table(res: dict, model: str) -> str:
    titles = [t for t, *_ in SETTINGS if any(k[0] == model and k[1] == t for k in res)]
    methods = sorted({k[2] for k in res if k[0] == model})
    own = {m: [res.get((model, t, m)) for t in titles] for m in methods}

    def order(m: str) -> tuple[int, float]:  # source, auto, by mean error over the settings run; subset rows
        if m in ("source", "auto"):
            return (("source", "auto").index(m), 0.0)
        if m.endswith(SUBSET_TAG):  # last: the source on the subset, then what ran on it
            return (3, 0.0 if m.startswith("source") else 1.0)
        vals = [v[0] for v in own[m] if v]
        return (2, sum(vals) / len(vals))

    def cells(m: str, values: list) -> list[str]:  # a subset row ran once: "=" in the other columns
        if not m.endswith(SUBSET_TAG):
            return [_fmt(v) for v in values]
        return [_fmt(v) if i == 0 else "= continual" for i, v in enumerate(values)]

    bn_titles = [t for t, *_ in BN_SETTINGS]
    head = titles + [f"BN model: {t}" for t in bn_titles]
    lines = ["| method | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for m in sorted(methods, key=order):
        row = cells(m, own[m]) + cells(m, [res.get((BN_MODEL, t, m)) for t in bn_titles])
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _best(vals: list[float], methods: list[str]) -> str:
    return ", ".join(f"{m} {v:.1f}" for v, m in sorted(zip(vals, methods))[:3])


def ranking_table(res: dict, model: str, other: str = BN_MODEL) -> str:
    """Per BN-model setting, how `other`'s ranking of the methods that ran on both compares with `model`'s."""
    lines = [
        f"| scenario | methods on both | Spearman ρ ({other} vs {model}) | best 3, {_short(other)} model | best 3, {model} |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for title, *_ in BN_SETTINGS:
        both = sorted(
            m
            for (mo, t, m) in res
            if mo == model and t == title and (other, title, m) in res and not m.endswith(SUBSET_TAG)
        )
        if len(both) < 3:
            continue
        a = [res[(other, title, m)][0] for m in both]
        b = [res[(model, title, m)][0] for m in both]
        rho = spearmanr(a, b).statistic
        lines.append(f"| {title} | {len(both)} | {rho:+.2f} | {_best(a, both)} | {_best(b, both)} |")
    return "\n".join(lines)


def _short(model: str) -> str:
    """A model's kind of normalisation, short ("BN", "GN", "LN"), as its column label; else its name."""
    return SHORT[BN] if model == BN_MODEL else SHORT.get(ARCH_MODELS.get(model, ""), model)


def cross_table(res: dict) -> str:
    """Per method, its error minus the source's on the same model and setting, for every model and the
    settings all three share; the last column counts the cells where it beat the source, per model."""
    mods = [BN_MODEL, *models(res)]
    titles = [t for t, *_ in BN_SETTINGS]
    methods = sorted(
        {
            m
            for (mo, t, m) in res
            if mo != BN_MODEL and t in titles and m != "source" and not m.endswith(SUBSET_TAG)
        }
    )

    def delta(model: str, title: str, m: str) -> float | None:
        if (model, title, m) not in res or (model, title, "source") not in res:
            return None
        # to the 0.1 points shown (no "-0.0"), and a win is a difference that shows
        return round(res[(model, title, m)][0] - res[(model, title, "source")][0], 1) + 0.0

    table = {m: [[delta(mo, t, m) for mo in mods] for t in titles] for m in methods}

    def order(m: str) -> tuple[int, float]:
        vals = [v for row in table[m] for v in row if v is not None]
        return (0 if m == "auto" else 1, sum(vals) / len(vals))

    def wins(m: str) -> str:
        parts = []
        for i, mo in enumerate(mods):
            vals = [table[m][j][i] for j in range(len(titles)) if table[m][j][i] is not None]
            if vals:
                parts.append(f"{_short(mo)} {sum(v < 0 for v in vals)}/{len(vals)}")
        return ", ".join(parts)

    head = [f"{t}: {_short(mo)}" for t in titles for mo in mods] + ["beats the source"]
    lines = ["| method | " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1) + " --- |"]
    for m in sorted(methods, key=order):
        vals = ["·" if v is None else f"{v:+.1f}" for row in table[m] for v in row]
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {wins(m)} |")
    return "\n".join(lines)


def models(res: dict) -> list[str]:
    """The non-BN models that have cells in `res`."""
    return sorted({k[0] for k in res} - {BN_MODEL})


def render(res: dict) -> str:
    parts, ms = [], models(res)
    for model in ms:
        parts.append(f"### {model}: error (%), [n] = collapse-guard restores\n\n{model_table(res, model)}\n")
        parts.append(f"### {model}: rankings against the BN ResNet-26\n\n{ranking_table(res, model)}\n")
    if len(ms) > 1:
        a, b = ms[:2]
        parts.append(f"### {b}: rankings against the {a}\n\n{ranking_table(res, b, a)}\n")
    if ms:
        parts.append(f"### {CROSS_TITLE}\n\n{cross_table(res)}\n")
    return "\n".join(parts)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--write"]
    results = Path(args[0]) if args else HERE
    res = load([*BN_DIRS, results])
    text = render(res)
    print(text, end="")
    if "--write" in sys.argv[1:]:
        own = HERE / "README.md"
        s = own.read_text()
        marker = "## Tables"
        head = s[: s.index(marker)] if marker in s else s.rstrip() + "\n\n"
        own.write_text(
            head + marker + "\n\n(`python benchmarks/archs/table.py --write`)\n\n" + text.rstrip() + "\n"
        )
        write_main_readme(res)


CROSS = "every model"  # the cross-model table's marker name


def main_readme_marker(model: str) -> str:
    return f"<!-- archs table: {model} (python benchmarks/archs/table.py --write) -->\n"


def write_main_readme(res: dict) -> None:
    """Each model's error table, and the cross-model table, into the main README after their marker
    lines (where there are some)."""
    path = HERE.parents[1] / "README.md"
    s = path.read_text()
    ms = models(res)
    tables = {main_readme_marker(m): model_table(res, m) for m in ms}
    if ms:
        tables[main_readme_marker(CROSS)] = cross_table(res)
    for marker, table in tables.items():
        if marker not in s:
            continue
        start = s.index(marker) + len(marker)
        if s.startswith("|", start):  # replace the table written last time
            s = s[:start] + table + s[s.index("\n\n", start) :]
        else:
            s = s[:start] + table + "\n" + s[start:]
    path.write_text(s)


if __name__ == "__main__":
    main()
