"""Benchmark suites: grids of cells (methods x scenarios x seeds) and their resumable execution."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from testtime.adapt.registry import get_method, list_methods
from testtime.bench.experiment import (
    ExecOptions,
    data_fallback_notice,
    execute_cell,
    prepare_out_dir,
    run_cells_sequential,
    with_checkpoints,
)
from testtime.bench.ray_backend import import_ray, run_cells_ray
from testtime.bench.report import render
from testtime.bench.runner import Cell, write_payload
from testtime.bench.speed import run_speed, speed_cells, stream_description
from testtime.device import select_device
from testtime.errors import ConfigError
from testtime.precision import precision_record


@dataclass
class SuiteArgs:
    """User choices that parameterise a suite."""

    seeds: list[int] = field(default_factory=lambda: [0])
    data: str = "auto"
    methods: list[str] | None = None  # restrict to these methods
    n_per_domain: int | None = None  # at most this many images per domain: a smaller, quicker suite


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    build: Callable[[SuiteArgs], list[Cell]]
    default_seeds: tuple[int, ...] = (0,)
    # runs all cells in this process in one go (no resumption, no pool) instead of the cell runner
    runner: Callable[[list[Cell], ExecOptions, Path, Console], Any] | None = None
    describe_data: Callable[[], str] | None = None  # for config.json (default: the suite name and --data)


def _methods(preferred: list[str], args: SuiteArgs) -> list[str]:
    available = list_methods()
    chosen = [m for m in preferred if m in available]
    if args.methods:
        unknown = [m for m in args.methods if m not in available]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}")
        chosen = [m for m in args.methods if m in chosen or m in available]
    return chosen


def _grid(methods: list[str], settings: list[dict[str, Any]], seeds: list[int]) -> list[Cell]:
    cells = []
    for s in settings:
        for seed in seeds:
            for m in methods:
                cells.append(Cell(method=m, seed=seed, **s))
    return cells


QUICK_METHODS = ["source", "bn", "tent", "eta", "eata", "sar", "deyo", "rotta", "roid", "lame", "unmix_tns",
                 "t3a"]  # fmt: skip
DIGIT_METHODS = ["source", "bn", "tent", "eata", "sar", "cotta"]


def quick(args: SuiteArgs) -> list[Cell]:
    """Embedded CIFAR-10 subset (250 images per corruption) in three scenarios, plus MNIST->USPS."""
    base = {"dataset": "cifar10", "data": "embedded", "severity": 5, "batch_size": 100, "n_per_domain": 250}
    settings = [
        {**base, "scenario": "continual"},
        {**base, "scenario": "correlated", "scenario_options": (("delta", "0.1"),)},
        {**base, "scenario": "mixed_domains"},
    ]
    digits = [{"dataset": "mnist_usps", "scenario": "continual", "batch_size": 200, "data": "auto"}]
    return _grid(_methods(QUICK_METHODS, args), settings, args.seeds) + _grid(
        _methods(DIGIT_METHODS, args), digits, args.seeds
    )


def paper(args: SuiteArgs) -> list[Cell]:
    """The published CIFAR-10-C protocol: full 10k test set, 15 corruptions, severity 5, batch 200,
    continual and reset_each_shift, every registered method. Methods that keep no state from one
    batch to the next (source, bn, lame, memo, alpha_bn: `keeps_state = False`) run once, continual:
    their reset_each_shift run is the same experiment (MEMO: up to its random augmentation draws)."""
    base = {"dataset": "cifar10", "data": args.data, "severity": 5, "batch_size": 200}
    methods = _methods(list_methods(), args)
    cells = _grid(methods, [{**base, "scenario": "continual"}], args.seeds)
    stateful = [m for m in methods if get_method(m).keeps_state]
    cells += _grid(stateful, [{**base, "scenario": "reset_each_shift"}], args.seeds)
    # methods whose paper uses the source training set (AdaNPC's memory, CAFA's statistics) get it
    return [dataclasses.replace(c, source_samples=get_method(c.method).paper_source_samples) for c in cells]


def scenarios(args: SuiteArgs) -> list[Cell]:
    """Every scenario of the literature on the full test set (1,000 images per domain, batch 200)."""
    base = {"dataset": "cifar10", "data": args.data, "severity": 5, "batch_size": 200, "n_per_domain": 1000}
    settings = [
        {**base, "scenario": s}
        for s in ("continual", "gradual", "mixed_domains", "correlated", "mixed_correlated", "imbalanced_label_shift",
                  "open_set", "forgetting")
    ]  # fmt: skip
    return _grid(_methods(["source", "bn", "tent", "eata", "sar", "cotta", "rotta", "roid", "lame"], args),
                 settings, args.seeds)  # fmt: skip


def digits(args: SuiteArgs) -> list[Cell]:
    """The real shifts MNIST->USPS and USPS->MNIST for every registered method."""
    settings = [{"dataset": d, "scenario": "continual", "batch_size": 200, "data": "auto"}
                for d in ("mnist_usps", "usps_mnist")]  # fmt: skip
    return _grid(_methods(list_methods(), args), settings, args.seeds)


# The zoo rows of `default_vs_zoo` (issue 15: "at least the zoo's best three methods of each column").
# Chosen from results committed before the suite ran, on no number of the recipe: the full-data
# continual table (benchmarks/cifar10c_paper: RMT 21.1, DeYO 21.7, CoTTA 22.4, ETA 22.7, ROID 23.1)
# and the quick suite's three scenarios (benchmarks/quick: DeYO, ROID, Tent best on mixed_domains;
# ROID, Tent, DeYO on correlated). RMT and CoTTA were not in the quick suite; RMT runs in every column,
# CoTTA/PETAL (about 2.5 h per CPU cell) only where a cell exists. Specialists of a column join it:
# LAME (label-correlated streams), SAR (imbalanced label shift, its paper's setting). MNIST->USPS:
# the quick suite's best (Tent, EATA, CoTTA) plus DeYO, ROID and RMT.
DEFAULT_RECIPE = "auto"
DEFAULT_VS_ZOO_BASELINES = ["source", "bn", "tent"]
DEFAULT_VS_ZOO_ZOO = ["rmt", "deyo", "roid"]
DEFAULT_VS_ZOO_EXTRA = {
    "continual": ["cotta", "eta"],
    "correlated": ["lame"],
    "mixed_correlated": ["lame"],
    "imbalanced_label_shift": ["sar"],
}
DEFAULT_VS_ZOO_DIGITS = ["source", "bn", "tent", "eata", "cotta", "deyo", "roid", "rmt"]


def default_vs_zoo_columns(data: str) -> list[tuple[str, dict[str, Any]]]:
    """The columns of `default_vs_zoo`, most informative first (the order cells run in)."""
    base = {"dataset": "cifar10", "data": data, "severity": 5, "batch_size": 200}
    corr = (("delta", "0.1"),)
    return [
        ("continual", {**base, "scenario": "continual"}),
        ("mixed_domains", {**base, "scenario": "mixed_domains"}),
        ("correlated", {**base, "scenario": "correlated", "scenario_options": corr}),
        ("mixed_correlated", {**base, "scenario": "mixed_correlated", "scenario_options": corr}),
        ("continual_b16", {**base, "scenario": "continual", "batch_size": 16}),
        ("imbalanced_label_shift", {**base, "scenario": "imbalanced_label_shift"}),
        # 5 + 9 x 14 = 131 severity steps: 1,000 images per step keep the stream at 131k images
        ("gradual", {**base, "scenario": "gradual", "n_per_domain": 1000}),
        ("mnist_usps", {"dataset": "mnist_usps", "scenario": "continual", "batch_size": 200, "data": "auto"}),
    ]


def default_vs_zoo(args: SuiteArgs) -> list[Cell]:
    """The library's default recipe (`auto`, every seed) against source, BN-adapt, Tent and the zoo's
    best methods (first seed) on the full 10k CIFAR-10-C test corruptions, severity 5, batch 200:
    continual, mixed_domains, correlated and mixed_correlated (delta 0.1), continual at batch 16,
    imbalanced_label_shift, gradual (1,000 images per severity step), plus MNIST->USPS. `--method`
    restricts the suite to those of its rows."""
    _methods([], args)  # unknown --method names are refused
    wanted = set(args.methods or list_methods())  # --method restricts this suite to those of its rows

    def rows(names: list[str]) -> list[str]:
        return [m for m in names if m in wanted]

    seeds = args.seeds
    cells: list[Cell] = []
    columns = default_vs_zoo_columns(args.data)
    for seed in seeds:  # the recipe first, column by column, so the targets are known early
        for _, setting in columns:
            cells += _grid(rows([DEFAULT_RECIPE]), [setting], [seed])
    for name, setting in columns:
        if setting["dataset"] == "mnist_usps":
            names = DEFAULT_VS_ZOO_DIGITS
        else:
            names = DEFAULT_VS_ZOO_BASELINES + DEFAULT_VS_ZOO_ZOO + DEFAULT_VS_ZOO_EXTRA.get(name, [])
        cells += _grid(rows(names), [setting], seeds[:1])
    return cells


# issue "Beyond one BatchNorm network": the shipped non-BatchNorm CIFAR-10 models and their norm kind
ARCH_MODELS = {"cifar10_resnet26_gn": "GroupNorm", "cifar10_vit": "LayerNorm"}
EXPENSIVE_METHODS = ("cotta", "petal", "memo")  # last in the grid: hours per full-data CPU cell
# MEMO adapts every image alone (weights restored after each), so its error does not depend on the
# order or mix of the stream: in `archs` it runs once, continual on this many images per corruption
# (the first of the stream's per-corruption permutation), beside the source on the same images, as
# MEMO's BN-model cell (benchmarks/cifar10c_memo_subset); ~4 img/s per thread makes 150k images ~10 h
MEMO_SUBSET = 500


def archs(args: SuiteArgs) -> list[Cell]:
    """Every method that runs on GroupNorm/LayerNorm models on the shipped GN ResNet-26 and ViT
    (those shipped in this version): full 10k CIFAR-10-C, severity 5, batch 200, continual,
    mixed_domains and correlated (delta 0.1; for the GN model also delta 0, each corruption sorted
    by class label: the reference code's CIFAR-10 GN label-correlated setting). BatchNorm-only
    methods (bn, alpha_bn, unmix_tns) are left out: they refuse these models. MEMO, which adapts
    each image alone (order and mix do not matter), runs once: continual on 500 images per
    corruption, beside the source on the same images."""
    from testtime.models.zoo import SHIPPED

    cells: list[Cell] = []
    for model, kind in ARCH_MODELS.items():
        if model not in SHIPPED:
            continue
        base = {"dataset": "cifar10", "data": args.data, "severity": 5, "batch_size": 200, "model": model}
        deltas = ("0.1", "0.0") if kind == "GroupNorm" else ("0.1",)  # "0.0" as `--delta 0` records it
        settings = [{**base, "scenario": "continual"}, {**base, "scenario": "mixed_domains"}] + [
            {**base, "scenario": "correlated", "scenario_options": (("delta", d),)} for d in deltas
        ]
        methods = [m for m in _methods(list_methods(), args) if kind in get_method(m).norm_support.kinds]
        methods.sort(key=lambda m: m in EXPENSIVE_METHODS)
        for m in methods:
            if m == "memo":  # stateless per image: one subset cell stands for every setting
                subset = {**settings[0], "n_per_domain": MEMO_SUBSET}
                cells += _grid(["memo", "source"], [subset], args.seeds)
            else:
                cells += _grid([m], settings, args.seeds)
    return [dataclasses.replace(c, source_samples=get_method(c.method).paper_source_samples) for c in cells]


def speed(args: SuiteArgs) -> list[Cell]:
    """Cost of every registered method in one process: images/s, ratio of wall time to plain
    inference on the same batches, passes per image (measured / minimal), adapted parameters and
    the memory the method keeps (embedded CIFAR-10, 3 corruptions x 200 images, batch 100; MEMO on
    3 x 10 images)."""
    return speed_cells(_methods(list_methods(), args), args.seeds)


def _speed_with(override: dict[str, str]) -> Callable[[SuiteArgs], list[Cell]]:
    def cells(args: SuiteArgs) -> list[Cell]:
        methods = _methods(list_methods(), args)
        return speed_cells(methods, args.seeds, overrides={m: dict(override) for m in methods})

    return cells


SPEED_VARIANTS = {
    "speed_bf16": (
        {"amp": "bf16"},
        "The speed suite with `amp=bf16`: every method's passes under bfloat16 autocast where bf16 is "
        "fast on this machine; where it is slow (no AVX512-BF16/AMX), a warning and float32 (set "
        "TESTTIME_BF16=fast to time bf16 anyway); the precision column says which ran. Compare with "
        "`speed` on the same machine.",
    ),
    "speed_auto": (
        {"amp": "auto"},
        "The speed suite with `amp=auto`: bfloat16 autocast where bf16 is fast on this machine, float32 "
        "elsewhere (the precision column says which ran); compare with `speed` on the same machine.",
    ),
    "speed_compile": (
        {"compile": "inductor"},
        "The speed suite with the forward of every network a method runs compiled by `torch.compile` "
        "(inductor); each method first runs the stream once untimed (compilation), is reset, then timed; "
        "compare with `speed` on the same machine.",
    ),
}


def _speed_suite(name: str, fn: Callable[[SuiteArgs], list[Cell]], doc: str) -> Suite:
    return Suite(name, doc, fn, (0,), runner=run_speed, describe_data=stream_description)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("quick", quick.__doc__ or "", quick, (0, 1)),
        Suite("paper", paper.__doc__ or "", paper, (0,)),
        Suite("scenarios", scenarios.__doc__ or "", scenarios, (0,)),
        Suite("digits", digits.__doc__ or "", digits, (0, 1, 2)),
        Suite("default_vs_zoo", default_vs_zoo.__doc__ or "", default_vs_zoo, (0, 1, 2)),
        Suite("archs", archs.__doc__ or "", archs, (0,)),
        _speed_suite("speed", speed, speed.__doc__ or ""),
        *(_speed_suite(n, _speed_with(o), doc) for n, (o, doc) in SPEED_VARIANTS.items()),
    ]
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name]


def _execute_in_worker(cell: Cell, opts: ExecOptions) -> dict[str, Any]:
    return execute_cell(cell, opts)


def pool_start_method(device: str) -> str | None:
    """`spawn` for workers on an accelerator (CUDA cannot be used in a forked child), else the
    platform's default (None)."""
    return None if select_device(device).type == "cpu" else "spawn"


def run_cells_pool(cells: list[Cell], opts: ExecOptions, out_dir: Path, jobs: int, console: Console) -> None:
    """Run cells in a local process pool; the parent writes each finished cell (no loss, no duplicates)."""
    threads = opts.threads or max(1, (os.cpu_count() or 1) // jobs)
    wopts = dataclasses.replace(opts, threads=threads)
    context = multiprocessing.get_context(pool_start_method(opts.device))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending: dict[Future, Cell] = {pool.submit(_execute_in_worker, c, wopts): c for c in cells}
        done_n = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                cell = pending.pop(fut)
                write_payload(out_dir, fut.result())
                done_n += 1
                console.log(f"[{done_n}/{len(cells)}] {cell.cell_id}")
            render(out_dir, plots=False)


BACKENDS = ("local", "ray")


def run_suite(
    suite_name: str,
    args: SuiteArgs,
    out: str | Path,
    opts: ExecOptions,
    jobs: int = 1,
    backend: str = "local",
    console: Console | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run (or resume) a suite into `out/<suite>`; completed cells are skipped.

    backend "local": a process pool of `jobs` workers (in this process if jobs is 1); "ray": one Ray
    task per cell on the cluster at `ray_address` (or $RAY_ADDRESS), else on a local Ray instance
    with `jobs` CPUs.
    """
    console = console or Console(stderr=True)
    suite = get_suite(suite_name)
    if not args.seeds:
        args.seeds = list(suite.default_seeds)
    cells = list({c.cell_id: c for c in suite.build(args)}.values())  # a cell named twice runs once
    if not cells:
        raise ConfigError(f"suite {suite_name!r} has no cells for the chosen methods")
    out_dir = Path(out) / suite_name
    identity: dict[str, Any] = {"suite": suite_name, "data": args.data}
    if args.n_per_domain is not None:  # a shrunk suite: its own folder, never mixed with the full one
        if args.n_per_domain < 1:
            raise ConfigError(f"--n-per-domain must be >= 1, got {args.n_per_domain}")
        n = args.n_per_domain
        cells = [dataclasses.replace(c, n_per_domain=min(c.n_per_domain or n, n)) for c in cells]
        out_dir = Path(out) / f"{suite_name}_n{n}"
        identity["n_per_domain"] = n
    methods = list(dict.fromkeys(c.method for c in cells))
    meta = {
        "suite": suite_name,
        "description": suite.description,
        "seeds": args.seeds,
        "methods": methods,
        "data_description": suite.describe_data()
        if suite.describe_data
        else f"suite {suite_name} (data={args.data})",
        "model": "per dataset",
        # how the cells ran (env's torch_threads is this parent process's, not the workers')
        "execution": {"backend": backend, "jobs": jobs, "threads_per_worker": opts.threads or "cores / jobs"},
    }
    # is bf16 fast on this machine (what amp=bf16 / amp=auto do here; testtime.precision); with Ray,
    # each cell records the precision it ran in
    meta["precision"] = precision_record(select_device(opts.device))
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "ray":
        if suite.runner is not None:
            raise ConfigError(
                f"suite {suite_name!r} is measured in one process so its timings compare; "
                "run it with --backend local"
            )
        import_ray()  # a clear error before anything is written
    fallback = data_fallback_notice(cells)
    if fallback:
        console.print(f"warning: {fallback}", style="bold yellow", markup=False, highlight=False)
        meta["data_fallback"] = fallback
    done = prepare_out_dir(out_dir, identity, meta)
    t0 = time.time()
    if suite.runner is not None:
        console.log(f"suite {suite_name}: {len(cells)} cells, measured in this process in one run")
        if jobs > 1:
            console.log(f"suite {suite_name}: --jobs {jobs} ignored (one process, so timings compare)")
        suite.runner(cells, opts, out_dir, console)
        render(out_dir, plots=True)
        console.log(f"suite {suite_name} finished in {time.time() - t0:.0f} s")
        return out_dir
    todo = [c for c in cells if c.cell_id not in done]
    opts = with_checkpoints(opts, out_dir)
    console.log(
        f"suite {suite_name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run"
    )
    if backend == "ray" and todo:
        run_cells_ray(todo, opts, out_dir, jobs, console, address=ray_address)
    elif jobs > 1 and todo:
        run_cells_pool(todo, opts, out_dir, jobs, console)
    else:
        run_cells_sequential(todo, opts, out_dir, console)
    render(out_dir, plots=True)
    console.log(f"suite {suite_name} finished in {time.time() - t0:.0f} s")
    return out_dir
