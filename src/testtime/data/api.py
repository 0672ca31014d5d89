"""One-line test streams for the Python API: the streams `testtime run` adapts on, as `(x, y)` batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from testtime.data.streams import Batch, Domain, Stream


@dataclass
class ImageStream:
    """A test stream as an iterable of `(x, y)` batches: x float (N, C, H, W) in [0, 1], y int64 labels.

    `stream` is the underlying `Stream` (its iteration yields `Batch` objects that also carry each
    sample's domain and the segment starts, where `reset_each_shift` resets); `len()` is the number
    of batches.
    """

    stream: Stream

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in self.stream:
            yield b.x, b.y

    def __len__(self) -> int:
        return len(self.stream)

    def batches(self) -> Iterator[Batch]:
        """The batches with their domain ids and segment flags."""
        return iter(self.stream)

    @property
    def domains(self) -> list[Domain]:
        return self.stream.domains

    @property
    def num_samples(self) -> int:
        return self.stream.num_samples

    def __repr__(self) -> str:
        return (
            f"ImageStream({self.stream.description}: {len(self)} batches of up to {self.stream.batch_size}, "
            f"{self.num_samples} images, {len(self.domains)} domains; {self.stream.data.describe()})"
        )


def make_stream(
    scenario: str = "continual",
    *,
    dataset: str = "cifar10",
    severity: int = 5,
    n_per_domain: int | None = None,
    batch_size: int = 200,
    data: str = "embedded",
    corrupted: str | os.PathLike | None = None,
    corruptions: Sequence[str] | None = None,
    seed: int = 0,
    corruption_seed: int = 0,
    subset: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    **scenario_options: float | str,
) -> ImageStream:
    """The test stream of `testtime run --dataset DATASET --scenario SCENARIO ...` as `(x, y)` batches.

    Built by the same code as the command line (`testtime.bench.experiment.build_cell_stream`), so the
    same arguments give the same images in the same order. `dataset`: cifar10 (CIFAR-10-C), cifar100,
    imagenet_c, mnist_usps, usps_mnist; `data`: "embedded" (the 2,000 CIFAR-10 test images shipped
    with the package), "auto" (the full test set from `$TESTTIME_DATA` if found, else the embedded
    images) or a path; `corrupted`: a directory of the official CIFAR-10-C / CIFAR-100-C `.npy`
    files (else corruptions are generated, deterministically in `corruption_seed`, and cached in
    `cache_dir`, default `$TESTTIME_CACHE` or `~/.cache/testtime`); `n_per_domain`: images per
    corruption (None: all); `seed`: the stream's order; `corruptions`: a subset, in this order
    (default: all 15); `scenario_options`: the scenario's own options (delta=, rounds=,
    imbalance_ratio=, unknown=, unknown_ratio=). `testtime scenarios` lists the scenarios. Bad
    values raise ConfigError/DataError before any image is corrupted.
    """
    from testtime.bench.experiment import ExecOptions, build_cell_stream, validate_cell
    from testtime.bench.runner import Cell

    cell = Cell(
        method="source",  # a cell needs a method; the stream does not depend on it
        scenario=scenario,
        seed=seed,
        dataset=dataset,
        severity=severity,
        batch_size=1 if scenario == "batch_size_1" else batch_size,
        scenario_options=tuple(sorted((k, str(v)) for k, v in scenario_options.items())),
        corruptions=tuple(corruptions) if corruptions else None,
        n_per_domain=n_per_domain,
        data=str(data),
        cifar10c=None if corrupted is None else str(corrupted),
        corruption_seed=corruption_seed,
        subset=None if subset is None else str(subset),
    )
    validate_cell(cell)
    opts = ExecOptions(cache_dir=None if cache_dir is None else str(cache_dir))
    return ImageStream(build_cell_stream(cell, opts, progress))


def cifar10c_stream(
    scenario: str = "continual",
    *,
    severity: int = 5,
    n_per_domain: int | None = None,
    batch_size: int = 200,
    data: str = "embedded",
    seed: int = 0,
    **kwargs: object,
) -> ImageStream:
    """A CIFAR-10-C test stream as `(x, y)` batches (x float (N, 3, 32, 32) in [0, 1]), e.g.

    `for x, y in cifar10c_stream("continual", severity=5, n_per_domain=100): ...` — the 15
    corruptions one after another, 100 of the shipped test images each. Other arguments as
    `make_stream` (corrupted=, corruptions=, corruption_seed=, cache_dir=, delta=, ...).
    """
    return make_stream(
        scenario,
        dataset="cifar10",
        severity=severity,
        n_per_domain=n_per_domain,
        batch_size=batch_size,
        data=data,
        seed=seed,
        **kwargs,  # type: ignore[arg-type]
    )
