"""Cost of `auto` relative to plain inference, on validation data only (speckle noise, severity 5).

    nice python benchmarks/default_recipe/cost.py

600 embedded CIFAR-10 test images in batches of 100, one thread; "x inference" is the method's wall
time over the mean of plain `inference_mode` passes of the same batches timed just before and after
(as in `testtime bench --suite speed`, whose stream uses test corruptions and so was not used here).
"""

from __future__ import annotations

import time

import torch

from testtime.adapt import adapt
from testtime.data.cifar import load_embedded_cifar10
from testtime.data.corruptions import corrupt
from testtime.models.zoo import load_model


def main() -> None:
    torch.set_num_threads(1)
    d = load_embedded_cifar10()
    x = torch.from_numpy(corrupt(d.x[:600], "speckle_noise", 5)).permute(0, 3, 1, 2).float().div(255)
    x = x.contiguous(memory_format=torch.channels_last)
    model = load_model().to(memory_format=torch.channels_last)
    batches = [x[i : i + 100] for i in range(0, 600, 100)]

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(b)
        return time.perf_counter() - t

    for label, method, options in (
        ("bn", "bn", {}),
        ("tent", "tent", {}),
        ("roid", "roid", {}),
        ("auto", "auto", {}),
        ("auto loss=none", "auto", {"loss": "none"}),
    ):
        a = adapt(model, method, **options)
        a(batches[0])  # warm-up batch, not timed
        a.reset()
        before = plain()
        t = time.perf_counter()
        for b in batches:
            a(b)
        took = time.perf_counter() - t
        after = plain()
        print(f"{label:16s} {took / ((before + after) / 2):.2f}x inference", flush=True)


if __name__ == "__main__":
    main()
