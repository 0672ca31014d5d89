"""Markdown tables of the `default_vs_zoo` suite from its cell files (issue 15).

    python benchmarks/default_vs_zoo/table.py [RESULTS_DIR]   # default: this folder
    python benchmarks/default_vs_zoo/table.py --write         # also rewrite the tables in the READMEs

Error (%) per column: the mean ± std over the seeds that ran (the seed count in brackets when 2;
the recipe's single seed marked "(1)"), otherwise the one seed's value; "·" where a cell has not
run yet. Then
NLL and ECE per column. The error table's last column is the cost, "x inference" (time per image
over plain inference of the source model, in the same process) from the speed suite run in
`speed/` (`testtime bench --suite speed -m <the rows> --threads 1`). Nothing here is typed in by
hand: every number is read from `cells/` and `speed/results.csv`.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from testtime.bench.suites import DEFAULT_RECIPE, default_vs_zoo_columns

HERE = Path(__file__).resolve().parent
ORDER = ["auto", "source", "bn", "tent", "rmt", "deyo", "roid", "cotta", "eta", "eata", "lame", "sar"]


def _value(cell: dict, metric: str) -> float | None:
    rows = [r for r in cell["rows"] if r["metric"] == metric]
    for r in rows:
        if r["corruption"] in ("mean", "all"):
            return float(r["value"])
    return statistics.mean(float(r["value"]) for r in rows) if rows else None


def load(results: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """(column, method) -> seed -> cell payload."""
    columns = default_vs_zoo_columns("auto")
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for f in sorted((results / "cells").glob("*.json")):
        cell = json.loads(f.read_text())
        c = cell["cell"]
        found = {**c, "scenario_options": tuple(map(tuple, c["scenario_options"]))}
        for name, setting in columns:
            keys = ("dataset", "scenario", "batch_size", "scenario_options", "n_per_domain")
            if all(
                found.get(k) == setting.get(k, default)
                for k, default in zip(keys, (None, None, 200, (), None))
            ):
                out[(name, c["method"])][int(c["seed"])] = cell
    return out


def x_inference(results: Path) -> dict[str, float]:
    """method -> x plain inference, from the speed suite's results in `results/speed/`."""
    f = results / "speed" / "results.csv"
    if not f.exists():
        return {}
    with f.open() as fh:
        return {r["method"]: float(r["value"]) for r in csv.DictReader(fh) if r["metric"] == "x_inference"}


def table(cells: dict, metric: str, digits: int, cost: dict[str, float] | None = None) -> str:
    columns = [n for n, _ in default_vs_zoo_columns("auto")]
    methods = sorted({m for _, m in cells}, key=lambda m: (ORDER.index(m) if m in ORDER else 99, m))
    head = columns + (["x inference"] if cost is not None else [])
    lines = ["| method | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for m in methods:
        row = []
        for col in columns:
            seeds = cells.get((col, m), {})
            vals = [v for s in sorted(seeds) if (v := _value(seeds[s], metric)) is not None]
            if not vals:
                row.append("·")
            elif len(vals) > 1:
                sd = statistics.stdev(vals)
                row.append(
                    f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"
                    + ("" if len(vals) >= 3 else f" ({len(vals)})")
                )
            else:
                row.append(f"{vals[0]:.{digits}f}" + (" (1)" if m == DEFAULT_RECIPE else ""))
        if cost is not None:
            row.append(f"{cost[m]:.2f}x" if m in cost else "·")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def render(results: Path) -> str:
    """The three tables (error with the cost column, NLL, ECE) of the cells in `results`."""
    cells = load(results)
    cost = x_inference(results)
    return "".join(
        f"### {title}\n\n{table(cells, metric, digits, cost if metric == 'error' else None)}\n\n"
        for metric, title, digits in (("error", "Error (%)", 1), ("nll", "NLL", 3), ("ece", "ECE (%)", 1))
    )


def error_table(text: str) -> str:
    """The error table alone, out of `render`'s text (the one the main README shows)."""
    start = text.index("| method | continual |")
    return text[start : text.index("\n\n", start)]


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--write"]
    results = Path(args[0]) if args else HERE
    text = render(results)
    print(text, end="")
    if "--write" in sys.argv[1:]:
        write_readmes(text)


def write_readmes(text: str) -> None:
    """The error table into the main README's `auto` section, all three tables at the end of this
    folder's README (from its "### Error (%)" heading on)."""
    error = error_table(text)
    main_readme = HERE.parents[1] / "README.md"
    s = main_readme.read_text()
    t0 = s.index("| method | continual |", s.index("### Our recipe `auto` (the default)"))
    main_readme.write_text(s[:t0] + error + s[s.index("\n\n", t0) :])
    own = HERE / "README.md"
    s = own.read_text()
    own.write_text(s[: s.index("### Error (%)")] + text.rstrip() + "\n")


if __name__ == "__main__":
    main()
