"""The ablation table of the adopted `auto` recipe (tune.FINAL), as markdown, from the finished
validation cells in `cells/` (nothing is run here; run the rows with tune.py first):

    nice python benchmarks/default_recipe/tune.py --only ablate7:LABEL,... \
        --scenarios continual_full,mixed_domains_full,correlated_full,mixed_correlated_full,continual_b16 --cache-dir DIR
    python benchmarks/default_recipe/ablation.py

Each row is the recipe with one part removed: `ablate7:*` in tune.py, plus two earlier rows that
are exactly such a removal (`auto:r7_rescale_r5_split1.0`: round 7 without round 6's prediction
check; `auto:r6_div0.9`: without round 7's rescale). A cell not run yet shows as "-".
"""

from __future__ import annotations

import json
import statistics
import sys

from tune import CONFIGS, FINAL, cell_file, summarise

STREAMS = ["continual_full", "mixed_domains_full", "correlated_full", "mixed_correlated_full"]
EXTRA = ["continual_b16"]  # shown, not in the mean (500 embedded images per corruption)
ROWS = [
    (FINAL, "**auto (round-7 defaults)**"),
    ("ablate7:no_source_blend", "without the source blend (test statistics only)"),
    ("ablate7:no_running_stats", "without shift-aware running statistics (each batch's own)"),
    ("ablate7:no_class_balance", "without class-balanced running statistics"),
    ("ablate7:steps_when_label_shifted", "stepping on label-shifted batches too"),
    ("ablate7:per_sample_label_test", "label test on per-sample noise (round 4's) instead of split halves"),
    ("auto:r7_rescale_r5_split1.0", "without the prediction check of label verdicts (round 6)"),
    ("ablate7:no_loss", "without the loss (normalisation + prior correction only)"),
    ("ablate7:no_weighting", "without certainty/diversity weighting"),
    ("ablate7:no_ensembling", "without weight ensembling (momentum_src 1)"),
    ("ablate7:no_prior_correction", "without prior correction"),
    ("auto:r6_div0.9", "without the rescaled prior correction (round 7)"),
]


def cell(label: str, scenario: str) -> dict | None:
    f = cell_file(label, scenario)
    return summarise(label, scenario, json.loads(f.read_text())) if f.exists() else None


def fmt(s: dict | None) -> str:
    if s is None:
        return "-"
    r = s["restores"]
    return f"{s['mean_error']:.2f}" + (f" ({r})" if r not in ("", 0, 0.0) else "")


def table() -> str:
    head = ["configuration", *STREAMS, "mean of 4", "mean NLL of 4", *EXTRA]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, name in ROWS:
        if label not in CONFIGS:
            raise SystemExit(f"unknown label {label!r} in ablation.ROWS")
        cells = [cell(label, s) for s in STREAMS]
        done = [c for c in cells if c is not None]
        full = len(done) == len(STREAMS)
        mean = f"{statistics.fmean(c['mean_error'] for c in done):.2f}" if full else "-"
        nll = f"{statistics.fmean(c['nll'] for c in done):.3f}" if full else "-"
        row = [name, *map(fmt, cells), mean, nll, *(fmt(cell(label, s)) for s in EXTRA)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
