"""Rounds 3 and 5 diagnostics (validation only): how far a batch's BatchNorm statistics move from a
running average, in the first and the last third of the layers, using the *source* models (no
adaptation), on the full-length validation streams and (round 5) on the digit network's MNIST
*training* images (its source domain; no test image of either benchmark).

    nice python benchmarks/default_recipe/shift_stats.py [continual_full,correlated_full,...]
    # round 5: continual_full,mixed_domains_full,correlated_full,mixed_correlated_full,continual_b16,mixed_correlated_l4
    # (printed output: shift_stats_round5.txt)

Per batch and layer: the symmetric KL divergence (`testtime.adapt.components.shift.symmetric_kl`)
between the batch's per-channel Gaussians and an exponential average (momentum 0.05) of the
earlier batches, restarted from the last batch when the first third's mean divergence exceeds
0.1. Prints percentiles (5/25/50/75/95) of the last third's mean divergence per stream in the
units of both label tests of `ShiftDetector`: times the batch size (`label_noise="per_sample"`,
round 3's choice of `label_threshold`) and divided by the last third's split-half divergence
(`label_noise="split_half"`, round 5).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune import SCENARIOS, cell_for

from testtime.adapt.components.shift import split_half_divergence, symmetric_kl
from testtime.bench.experiment import ExecOptions, build_cell_stream, source_model


def layer_stats(model: torch.nn.Module, batches) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per batch, per BatchNorm layer (module order): the input's per-channel mean and biased
    variance and its split-half divergence, from the source `model` (no adaptation)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    current: list[tuple[torch.Tensor, ...]] = []

    def hook(mod, inp, out):
        t = inp[0].float()
        dims = [0, *range(2, t.dim())]
        current.append((t.mean(dims), t.var(dims, unbiased=False), split_half_divergence(t, 1e-5)))

    hooks = [b.register_forward_hook(hook) for b in bns]
    out = []
    with torch.no_grad():
        for x in batches:
            current.clear()
            model(x)
            out.append(list(current))
    for h in hooks:
        h.remove()
    return out


def batch_stats(scenario: str) -> list[list[tuple[torch.Tensor, ...]]]:
    """`layer_stats` of the shipped ResNet-26 over a validation stream of `tune.py`."""
    cell = cell_for("source", scenario)
    stream = build_cell_stream(cell, ExecOptions(threads=1))
    model = source_model(cell, torch.device("cpu")).eval()
    return layer_stats(model, (batch.x for batch in stream))


def scores(rows: list[list[tuple[torch.Tensor, ...]]], batch: int) -> dict[str, np.ndarray]:
    """Per batch (the first excluded): the deep third's divergence from the running average, times
    the batch size (`label_noise="per_sample"`), and divided by the deep third's split-half
    divergence (`label_noise="split_half"`)."""
    n = len(rows[0])
    third = (n + 2) // 3
    ema = [(r[0].clone(), r[1].clone()) for r in rows[0]]
    deep, half, restart = [], [], False
    for t in range(1, len(rows)):
        if restart:
            ema = [(r[0].clone(), r[1].clone()) for r in rows[t - 1]]
            restart = False
        kl = [float(symmetric_kl(rows[t][i][0], rows[t][i][1], *ema[i], 1e-5)) for i in range(n)]
        deep.append(np.mean(kl[n - third :]))
        half.append(np.mean([float(rows[t][i][2]) for i in range(n - third, n)]))
        restart = np.mean(kl[:third]) > 0.1
        ema = [(e[0].lerp(x[0], 0.05), e[1].lerp(x[1], 0.05)) for e, x in zip(ema, rows[t])]
    deep_a, half_a = np.array(deep), np.array(half)
    return {"per_sample": deep_a * batch, "split_half": deep_a / half_a}


def mnist_train_batches(order: str, batch: int, n_batches: int):
    """(x, y) batches of the MNIST *training* images (the digit network's source domain; no test
    image): i.i.d. (`order="iid"`) or label-correlated (`"dirichlet"`: delta 0.1, as the test
    scenarios), at most `n_batches` of `batch` images."""
    from testtime.data.digits import load_digits
    from testtime.data.streams import dirichlet_order

    data = load_digits("mnist", "train")
    x = torch.as_tensor(np.asarray(data.x)).permute(0, 3, 1, 2).float() / 255
    y = np.asarray(data.y)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y)) if order == "iid" else dirichlet_order(y, 0.1, rng)
    for k in range(min(n_batches, len(idx) // batch)):
        sel = idx[k * batch : (k + 1) * batch]
        yield x[sel], torch.as_tensor(y[sel]).long()


def digit_stats(order: str, batch: int, n_batches: int = 200) -> list[list[tuple[torch.Tensor, ...]]]:
    """`layer_stats` of the shipped digit network over `mnist_train_batches`."""
    from testtime.models.zoo import load_model

    model = load_model("mnist_digitnet").eval()
    return layer_stats(model, (x for x, _ in mnist_train_batches(order, batch, n_batches)))


def main() -> None:
    """Percentiles (5/25/50/75/95) of both label-shift statistics per validation stream, then on
    the digit network's source domain (round 5: does the statistic transfer across networks?)."""
    torch.set_num_threads(1)
    scenarios = (
        sys.argv[1]
        if len(sys.argv) > 1
        else "continual_full,mixed_domains_full,correlated_full,mixed_correlated_full"
    ).split(",")
    streams = [(s, lambda s=s: batch_stats(s), SCENARIOS[s][2]) for s in scenarios if s]
    for order in ("iid", "dirichlet"):
        for b in (200, 16):
            streams.append((f"digits_mnist_train_{order}_b{b}", lambda o=order, b=b: digit_stats(o, b), b))
    for name, get, batch in streams:
        for stat, v in scores(get(), batch).items():
            pct = np.percentile(v, [5, 25, 50, 75, 95]).round(4)
            print(f"{name:34s} {stat:10s} {pct}", flush=True)


if __name__ == "__main__":
    main()
