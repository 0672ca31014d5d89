"""Round-3 diagnostics (validation only): how far a batch's BatchNorm statistics move from a
running average, in the first and the last third of the layers, on the full-length validation
streams, using the *source* model (no adaptation).

    nice python benchmarks/default_recipe/shift_stats.py [continual_full,correlated_full,...]

Per batch and layer: the symmetric KL divergence (`testtime.adapt.components.shift.symmetric_kl`)
between the batch's per-channel Gaussians and an exponential average (momentum 0.05) of the
earlier batches, restarted from the last batch when the first third's mean divergence exceeds
0.1. Prints percentiles of the last third's mean divergence per stream: it separates i.i.d.
streams (continual, mixed_domains) from label-correlated ones, which chose `label_threshold`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune import cell_for

from testtime.adapt.components.shift import symmetric_kl
from testtime.bench.experiment import ExecOptions, build_cell_stream, source_model


def batch_stats(scenario: str) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    cell = cell_for("source", scenario)
    stream = build_cell_stream(cell, ExecOptions(threads=1))
    model = source_model(cell, torch.device("cpu")).eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    current: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        b.register_forward_hook(
            lambda mod, inp, out: current.append(
                (inp[0].float().mean((0, 2, 3)), inp[0].float().var((0, 2, 3), unbiased=False))
            )
        )
        for b in bns
    ]
    out = []
    with torch.no_grad():
        for batch in stream:
            current.clear()
            model(batch.x)
            out.append(list(current))
    for h in hooks:
        h.remove()
    return out


def main() -> None:
    torch.set_num_threads(1)
    scenarios = (
        sys.argv[1]
        if len(sys.argv) > 1
        else "continual_full,mixed_domains_full,correlated_full,mixed_correlated_full"
    ).split(",")
    for scenario in scenarios:
        rows = batch_stats(scenario)
        n = len(rows[0])
        third = (n + 2) // 3
        ema = [(m.clone(), v.clone()) for m, v in rows[0]]
        deep, restart = [], False
        for t in range(1, len(rows)):
            if restart:
                ema = [(m.clone(), v.clone()) for m, v in rows[t - 1]]
                restart = False
            kl = [float(symmetric_kl(*rows[t][i], *ema[i], 1e-5)) for i in range(n)]
            deep.append(np.mean(kl[n - third :]))
            restart = np.mean(kl[:third]) > 0.1
            ema = [(e[0].lerp(x[0], 0.05), e[1].lerp(x[1], 0.05)) for e, x in zip(ema, rows[t])]
        pct = np.percentile(deep, [5, 25, 50, 75, 95]).round(4)
        print(f"{scenario:24s} last-third divergence, percentiles 5/25/50/75/95: {pct}", flush=True)


if __name__ == "__main__":
    main()
