"""Round 6 diagnostic (validation only): are the batches that `auto`'s shift detector calls
label-shifted also batches whose *predictions* cover few classes?

    nice python benchmarks/default_recipe/label_diversity.py [digits,continual_full,...] [CACHE_DIR]
    # round 6: digits,continual_full,mixed_domains_full,correlated_full,mixed_correlated_full,continual_b16,mixed_correlated_l4
    # (printed output: label_diversity_round6.txt; "digits": the digit network's streams)

Runs the `auto` recipe as adopted in round 5 (the library's defaults then) on the validation
streams of `tune.py` and on the digit network's MNIST *training* images (its source domain; no
MNIST-test or USPS image): i.i.d., label-correlated (Dirichlet delta 0.1) and, as a held-out
domain shift of that network, the same i.i.d. images with every stroke thickened (a 3x3 grey-scale
dilation). Per batch it records whether the detector judged the batch label-shifted (the decision
that gates the gradient step) and two diversities (`components.shift.prediction_diversity`: the
entropy of a histogram of class indices over log(min(classes, batch size)), in [0, 1]):

- `pred`: entropy of the histogram of the batch's predicted classes (argmax of the raw logits);
- `true`: the same of its true labels (for the reader only: a method never sees them).

It prints, per stream, how many batches were judged label-shifted and the percentiles
(5/25/50/75/95) of `pred` among the judged and the not-judged batches, and of `true`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shift_stats import mnist_train_batches
from tune import cell_for

from testtime.adapt import adapt
from testtime.adapt.components.shift import prediction_diversity
from testtime.bench.experiment import ExecOptions, build_cell_stream, source_model

ROUND5 = {
    "label_threshold": 1.0,
    "label_noise": "split_half",
    "label_diversity": 1.0,
    "prior_rescale": False,
}  # pinned: the recipe this round starts from (the library's defaults after round 5)


def run(model: torch.nn.Module, batches, n_classes: int) -> dict[str, np.ndarray]:
    """`auto` (round 5) over `batches` of (x, y): per batch label-shifted?, pred and true diversity."""
    adapted = adapt(model, "auto", seed=0, **ROUND5)
    captured: list[torch.Tensor] = []
    adapted.model.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    flagged, pred, true = [], [], []
    for x, y in batches:
        captured.clear()
        adapted(x)
        d = adapted.shift_detector
        flagged.append(bool(d.slow) if d is not None else False)
        pred.append(prediction_diversity(captured[0].argmax(1), n_classes))
        true.append(prediction_diversity(y, n_classes))
    return {"flagged": np.array(flagged), "pred": np.array(pred), "true": np.array(true)}


def cifar(scenario: str, cache: str | None) -> dict[str, np.ndarray]:
    """The shipped ResNet-26 over a validation stream of `tune.py` (the source row's stream: a
    stream does not depend on the method)."""
    cell = cell_for("source", scenario)
    stream = build_cell_stream(cell, ExecOptions(threads=1, cache_dir=cache))
    model = source_model(cell, torch.device("cpu"))
    return run(model, ((b.x, b.y) for b in stream), 10)


def digits(order: str, batch: int, n_batches: int = 150) -> dict[str, np.ndarray]:
    """The digit network on `shift_stats.mnist_train_batches`: "iid", "dirichlet" (delta 0.1) or
    "thick" (i.i.d., strokes dilated by a 3x3 max filter: a domain shift held out from the test's USPS)."""
    from testtime.models.zoo import load_model

    batches = mnist_train_batches("dirichlet" if order == "dirichlet" else "iid", batch, n_batches)
    if order == "thick":
        batches = ((F.max_pool2d(x, 3, stride=1, padding=1), y) for x, y in batches)
    return run(load_model("mnist_digitnet"), batches, 10)


def main() -> None:
    torch.set_num_threads(1)
    scenarios = (
        sys.argv[1]
        if len(sys.argv) > 1
        else "continual_full,mixed_domains_full,correlated_full,mixed_correlated_full"
    ).split(",")
    cache = sys.argv[2] if len(sys.argv) > 2 else None
    streams = [
        (f"digits_mnist_train_{o}_b{b}", lambda o=o, b=b: digits(o, b))
        for o in ("iid", "thick", "dirichlet")
        for b in (200, 16)
        if "digits" in scenarios
    ]
    streams += [(s, lambda s=s: cifar(s, cache)) for s in scenarios if s and s != "digits"]
    pct = [5, 25, 50, 75, 95]
    for name, get in streams:
        r = get()
        f = r["flagged"]
        print(f"{name:32s} batches {len(f):4d}  label-shifted {int(f.sum()):4d}", flush=True)
        for what, v in (
            ("pred|shifted", r["pred"][f]),
            ("pred|not", r["pred"][~f]),
            ("true|shifted", r["true"][f]),
            ("true|not", r["true"][~f]),
        ):
            if len(v):
                print(f"    {what:13s} {np.percentile(v, pct).round(3)}", flush=True)


if __name__ == "__main__":
    main()
