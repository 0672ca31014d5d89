"""Executing cells (a method on a scenario with a seed) and `testtime run` over a RunConfig."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from testtime.adapt.base import AdaptedModel
from testtime.adapt.config import with_overrides
from testtime.adapt.registry import adapt, get_method, list_methods
from testtime.bench.report import group_label, load_rows, render, several_models
from testtime.bench.runner import (
    PARTIAL_DIR,
    Cell,
    cell_payload,
    completed_cells,
    run_stream,
    write_payload,
)
from testtime.data.cifar import (
    ImageSet,
    embedded_fallback_notice,
    find_cifar10,
    find_cifar100,
    load_cifar10,
    load_cifar100,
    load_embedded_cifar10,
    shared_data_dirs,
)
from testtime.data.digits import load_digits
from testtime.data.streams import (
    Cifar10CFiles,
    Cifar100CFiles,
    CorruptedDataset,
    DomainData,
    NaturalShift,
    Stream,
    StreamSpec,
    build_stream,
    check_scenario_options,
    list_scenarios,
)
from testtime.device import describe_device, select_device
from testtime.errors import ConfigError, DataError
from testtime.models.zoo import (
    DEFAULT_MODELS,
    SHIPPED,
    cell_model_name,
    is_known_model,
    known_models_hint,
    load_model,
    model_info,
)
from testtime.precision import precision_record
from testtime.utils import atomic_write_json, env_info, seed_everything

DATASETS = {
    "cifar10": "CIFAR-10-C (15 corruptions generated from CIFAR-10 test images, or the official files)",
    "cifar100": "CIFAR-100-C (generated from the CIFAR-100 test set given by --data, or the official "
    "files given by --corrupted)",
    "imagenet_c": "ImageNet-C from a directory (--data DIR: <corruption>/<severity>/<wnid>/*.JPEG; "
    "--subset FILE for a list of images such as RobustBench's 5,000)",
    "mnist_usps": "MNIST-trained model tested on USPS (all 9,298 digits), a real shift",
    "usps_mnist": "USPS-trained model tested on MNIST (10,000 test digits), a real shift",
}
MODEL_DATASETS = {  # the training set a model must come from, per test dataset
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "imagenet_c": "imagenet",
    "mnist_usps": "mnist",
    "usps_mnist": "usps",
}


@dataclass
class ExecOptions:
    """How cells run (not what they compute)."""

    device: str = "cpu"
    threads: int = 0
    cache_dir: str | None = None
    # resumable progress inside a cell: a snapshot in `checkpoint_dir` (the run's `partial/` folder
    # when run by `testtime run`/`bench`) every `checkpoint_every` seconds of work; <0: never
    checkpoint_dir: str | None = None
    checkpoint_every: float = 600.0


@dataclass
class RunConfig:
    """`testtime run`: methods x seeds on one dataset/scenario; recorded in config.json."""

    methods: list[str] = field(default_factory=lambda: ["source", "bn", "tent"])
    dataset: str = "cifar10"  # cifar10 (CIFAR-10-C) | mnist_usps | usps_mnist
    scenario: str = "continual"
    scenario_options: dict[str, str] = field(default_factory=dict)  # delta, rounds, imbalance_ratio, ...
    severity: int = 5
    batch_size: int = 200
    data: str = "embedded"  # "embedded", "auto" (full set if found, else embedded) or a path
    cifar10c: str | None = None  # directory of official CIFAR-10-C / CIFAR-100-C .npy files (--corrupted)
    subset: str | None = None  # imagenet_c: list file of relative image paths to use
    corruptions: list[str] | None = None  # None: every domain of the dataset
    n_per_domain: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    corruption_seed: int = 0
    model: str | None = None  # None: the dataset's shipped model
    model_path: str | None = None
    arch: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    source_samples: int = 0  # clean training images given to every method (methods that need some get 2000)
    out: str = "results"
    run_id: str | None = None
    exec: ExecOptions = field(default_factory=ExecOptions)

    def validate(self) -> None:
        """Raise ConfigError on a bad value before any data is loaded or generated."""
        validate_methods(self.methods, self.overrides)
        for name, value, lo in (
            ("batch size", self.batch_size, 1),
            ("n_per_domain", self.n_per_domain, 1),
            ("source_samples", self.source_samples, 0),
            ("corruption_seed", self.corruption_seed, 0),
            ("threads", self.exec.threads, 0),
            *(("seed", s, 0) for s in self.seeds),
        ):
            if value is not None and not (isinstance(value, int) and value >= lo):
                raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not (isinstance(self.severity, int) and 1 <= self.severity <= 5):
            raise ConfigError(f"severity must be an integer in 1..5, got {self.severity!r}")
        for m in expand_methods(self.methods):  # option values, e.g. -o lr=-1
            with_overrides(get_method(m).Config(), method_overrides(m, self.overrides))

    def cells(self) -> list[Cell]:
        self.validate()
        return [
            Cell(
                method=m,
                scenario=self.scenario,
                seed=seed,
                dataset=self.dataset,
                severity=self.severity,
                batch_size=self.batch_size,
                scenario_options=tuple(sorted(self.scenario_options.items())),
                corruptions=tuple(self.corruptions) if self.corruptions else None,
                n_per_domain=self.n_per_domain,
                overrides=tuple(sorted(method_overrides(m, self.overrides).items())),
                data=self.data,
                cifar10c=self.cifar10c,
                subset=self.subset,
                corruption_seed=self.corruption_seed,
                model=self.model,
                model_path=self.model_path,
                arch=self.arch,
                source_samples=self.source_samples,
            )
            for seed in self.seeds
            for m in expand_methods(self.methods)
        ]


# ----------------------------------------------------------------------------- validation
def expand_methods(methods: list[str]) -> list[str]:
    if not methods:
        raise ConfigError("no method given")
    out: list[str] = []
    for m in methods:
        for name in list_methods() if m == "all" else [m]:
            get_method(name)  # raises on unknown names
            if name not in out:
                out.append(name)
    return out


def method_overrides(method: str, overrides: dict[str, str]) -> dict[str, str]:
    fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
    return {k: v for k, v in overrides.items() if k in fields}


def validate_methods(methods: list[str], overrides: dict[str, str]) -> None:
    names = expand_methods(methods)
    known = set().union(*({f.name for f in dataclasses.fields(get_method(m).Config)} for m in names))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"option(s) {', '.join(unknown)} belong to none of the methods {', '.join(names)}")


def validate_cell(cell: Cell) -> None:
    get_method(cell.method)
    if cell.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cell.dataset!r}; known: {', '.join(DATASETS)}")
    if cell.scenario not in list_scenarios():
        raise ConfigError(f"unknown scenario {cell.scenario!r}; known: {', '.join(list_scenarios())}")
    check_scenario_options(cell.scenario, dict(cell.scenario_options))
    if cell.subset is not None and cell.dataset != "imagenet_c":
        raise ConfigError("--subset (a list of image paths) applies to --dataset imagenet_c only")
    if cell.cifar10c is not None and cell.dataset not in ("cifar10", "cifar100"):
        hint = "; pass the ImageNet-C directory as --data" if cell.dataset == "imagenet_c" else ""
        raise ConfigError(
            f"--corrupted (.npy files) applies to cifar10 and cifar100, not {cell.dataset}{hint}"
        )
    if cell.model_path is not None and not Path(cell.model_path).is_file():
        raise ConfigError(f"weights file not found: {cell.model_path} (--model-path)")
    name = cell_model_name(cell.dataset, cell.model)
    if cell.model_path is None and not is_known_model(name):
        raise ConfigError(f"unknown model {name!r}; {known_models_hint()}")
    if is_known_model(name) and not (cell.model_path and cell.arch):  # --arch: the user's own model
        trained_on = model_info(name).dataset
        if trained_on != MODEL_DATASETS[cell.dataset]:
            raise ConfigError(
                f"model {name} was trained on {trained_on}; dataset {cell.dataset} needs a model "
                f"trained on {MODEL_DATASETS[cell.dataset]} (e.g. {DEFAULT_MODELS[cell.dataset]})"
            )


resolve_device = select_device  # the one device helper (testtime.device), under its older name


# ----------------------------------------------------------------------------- data & models (cached)
_DATA: dict[tuple[Any, ...], tuple[DomainData, ImageSet | None]] = {}
_MODELS: dict[tuple[Any, ...], torch.nn.Module] = {}


def data_fallback_notice(cells: list[Cell]) -> str | None:
    """The warning for `--data auto` without the full CIFAR-10 (the run uses the shipped subset), or None."""
    auto = any(c.dataset == "cifar10" and c.data == "auto" and not c.cifar10c for c in cells)
    return embedded_fallback_notice() if auto and find_cifar10() is None else None


def load_clean(data: str) -> ImageSet:
    if data == "embedded":
        return load_embedded_cifar10()
    if data == "auto":
        return load_cifar10("test") if find_cifar10() is not None else load_embedded_cifar10()
    return load_cifar10("test", data)


def domain_data(cell: Cell, cache_dir: str | None, log: Callable[[str], None] | None = None) -> DomainData:
    """The test-domain source of `cell.dataset` (cached per process)."""
    key = (cell.dataset, cell.data, cell.cifar10c, cell.subset, cell.corruption_seed, cache_dir)
    if key not in _DATA:
        clean: ImageSet | None
        if cell.dataset == "cifar10":
            clean = load_clean(cell.data)
            src: DomainData = (
                Cifar10CFiles(cell.cifar10c, clean)
                if cell.cifar10c
                else CorruptedDataset(clean, seed=cell.corruption_seed, cache_dir=cache_dir, progress=log)
            )
        elif cell.dataset == "cifar100":
            clean = load_clean_cifar100(cell.data)
            if cell.cifar10c:
                src = Cifar100CFiles(cell.cifar10c, clean)
            elif clean is None:
                raise ConfigError(
                    "cifar100 needs the CIFAR-100 test set to generate corruptions from (--data PATH to "
                    "cifar-100-python) or the official CIFAR-100-C files (--corrupted DIR)"
                )
            else:
                src = CorruptedDataset(clean, seed=cell.corruption_seed, cache_dir=cache_dir, progress=log)
        elif cell.dataset == "imagenet_c":
            from testtime.data.imagenet_c import ImageNetC

            clean, src = None, ImageNetC(imagenet_c_root(cell.data), subset=cell.subset)
        elif cell.dataset in ("mnist_usps", "usps_mnist"):
            s, t = cell.dataset.split("_")
            path = None if cell.data in ("embedded", "auto") else cell.data
            clean = load_digits(s, "test", path)
            src = NaturalShift(t, load_digits(t, "all" if t == "usps" else "test", path), clean)
        else:
            raise ConfigError(f"unknown dataset {cell.dataset!r}; known: {', '.join(DATASETS)}")
        _DATA[key] = (src, clean)
    return _DATA[key][0]


def load_clean_cifar100(data: str) -> ImageSet | None:
    """The CIFAR-100 test set from a path, or found in the data directories ('embedded'/'auto'), or None."""
    if data in ("embedded", "auto"):
        return load_cifar100("test") if find_cifar100() is not None else None
    return load_cifar100("test", data)


IMAGENET_C_DIRS = ("ImageNet-C", "imagenet-c", "imagenet_c")


def imagenet_c_root(data: str) -> str:
    """The ImageNet-C directory: `data`, or for 'embedded'/'auto' one found in the data directories."""
    if data not in ("embedded", "auto"):
        return data
    for d in shared_data_dirs():
        for name in IMAGENET_C_DIRS:
            if (d / name).is_dir():
                return str(d / name)
    raise DataError(
        "imagenet_c needs the ImageNet-C directory: pass --data DIR "
        "(<corruption>/<severity>/<wnid>/*.JPEG) or put ImageNet-C under $TESTTIME_DATA"
    )


DEFAULT_SOURCE_SAMPLES = 2000  # for methods that cannot run without source data
CIFAR_TRAIN = {  # dataset: (name, finder, loader, files to put under $TESTTIME_DATA)
    "cifar10": ("CIFAR-10", find_cifar10, load_cifar10, "cifar10_jpeg.npz or cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", find_cifar100, load_cifar100, "cifar-100-python"),
}


def source_data(cell: Cell) -> ImageSet | None:
    """A class-balanced sample of the dataset's clean training split for the method, or None."""
    needs = getattr(get_method(cell.method), "requires_source_data", False)
    n = cell.source_samples or (DEFAULT_SOURCE_SAMPLES if needs else 0)
    if n <= 0:
        return None
    if cell.dataset in CIFAR_TRAIN:
        name, find, load, files = CIFAR_TRAIN[cell.dataset]
        path = None if cell.data in ("embedded", "auto") else cell.data
        if find(path) is None:
            raise ConfigError(
                f"{cell.method} needs source (training) images, but the {name} training set was not found; "
                f"put {files} under $TESTTIME_DATA (or pass --data PATH)"
            )
        train = load("train", path)
    elif cell.dataset == "imagenet_c":
        raise ConfigError(
            f"{cell.method} is given source (training) images here, which testtime does not load for "
            "ImageNet; use --source-samples 0 and a method that runs without them"
        )
    else:
        train = load_digits(cell.dataset.split("_")[0], "train")
    rng = np.random.default_rng(cell.seed)
    per_class = max(1, n // int(train.y.max() + 1))
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(train.y == c))[:per_class] for c in np.unique(train.y)]
    )
    idx = np.sort(idx)
    return ImageSet(train.x[idx], train.y[idx], f"{train.source} (training split, {len(idx)} images)")


def source_model(cell: Cell, device: torch.device) -> torch.nn.Module:
    name = cell_model_name(cell.dataset, cell.model)
    key = (name, cell.model_path, cell.arch, str(device))
    if key not in _MODELS:
        m = load_model(name, cell.model_path, cell.arch)
        _MODELS[key] = m.to(device, memory_format=torch.channels_last)
    return _MODELS[key]


def build_cell_stream(cell: Cell, opts: ExecOptions, log: Callable[[str], None] | None = None):
    data = domain_data(cell, opts.cache_dir, log)
    spec = StreamSpec(
        data=data,
        corruptions=cell.corruptions or data.domain_names(),
        severity=cell.severity,
        batch_size=cell.batch_size,
        seed=cell.seed,
        n_per_domain=cell.n_per_domain,
        options=dict(cell.scenario_options),
    )
    return build_stream(cell.scenario, spec)


@dataclass
class PreparedCell:
    """A cell ready to run: its stream (data materialised), the source model and the wrapped method."""

    stream: Stream
    model: torch.nn.Module  # the shared source model (the method wraps a copy)
    adapted: AdaptedModel
    setup_seconds: float  # building the method (copy, source statistics, warm-up, ...)


def prepare_cell(cell: Cell, opts: ExecOptions, log: Callable[[str], None] | None = None) -> PreparedCell:
    """Validate `cell`, build its stream, seed, and wrap the source model; nothing runs yet."""
    validate_cell(cell)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = select_device(opts.device)
    stream = build_cell_stream(cell, opts, log)
    for d in stream.domains:  # materialise (generate/cache) the data before timing starts
        stream.data.get(d)
    seed_everything(cell.seed)
    model = source_model(cell, device)
    source = source_data(cell)
    t0 = time.perf_counter()
    adapted = adapt(model, cell.method, source_data=source, seed=cell.seed, **dict(cell.overrides)).to(device)
    return PreparedCell(stream, model, adapted, time.perf_counter() - t0)


def execute_cell(
    cell: Cell,
    opts: ExecOptions,
    on_batch: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run one cell and return its result payload (nothing is written)."""
    prep = prepare_cell(cell, opts, log)
    if on_start:
        on_start(len(prep.stream))
    partial = None
    if opts.checkpoint_dir is not None and opts.checkpoint_every >= 0:
        partial = Path(opts.checkpoint_dir) / f"{cell.cell_id}.pt"
        if partial.is_file() and log:
            log(f"{cell.cell_id}: resuming from {partial}")
    res = run_stream(prep.adapted, prep.stream, on_batch, partial, max(0.0, opts.checkpoint_every))
    res.extra["data"] = prep.stream.data.describe()
    res.extra["device"] = describe_device(select_device(opts.device))
    res.extra["torch"] = torch.__version__
    res.extra["precision"] = prep.adapted.describe()["precision"]  # fp32 | bf16, as run
    return cell_payload(cell, res, prep.adapted.describe())


def progress_bar(console: Console, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("err: batch {task.fields[err]:4.1f}% mean {task.fields[mean]:4.1f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def with_checkpoints(opts: ExecOptions, out_dir: Path) -> ExecOptions:
    """`opts` with progress snapshots in `out_dir/partial` unless a folder was chosen."""
    if opts.checkpoint_dir is not None:
        return opts
    return dataclasses.replace(opts, checkpoint_dir=str(Path(out_dir) / PARTIAL_DIR))


def run_cells_sequential(cells: list[Cell], opts: ExecOptions, out_dir: Path, console: Console) -> None:
    """Run cells one after another in this process with progress bars; write each when done."""
    for cell in cells:
        label = f"[bold]{cell.method}[/] {cell.dataset}/{cell.scenario} seed {cell.seed}"
        with progress_bar(console, label) as progress:
            task = progress.add_task("run", total=None, err=float("nan"), mean=float("nan"))
            errors: list[float] = []  # per batch; "mean" is their mean (batches are equal but the last)

            def on_batch(_b: int, e: float, t=task, errors=errors) -> None:
                if not math.isnan(e):
                    errors.append(e)
                mean = sum(errors) / len(errors) if errors else float("nan")
                progress.update(t, advance=1, err=e, mean=mean)

            payload = execute_cell(
                cell,
                opts,
                on_batch=on_batch,
                log=console.log,
                on_start=lambda n, t=task: progress.update(t, total=n),
            )
        write_payload(out_dir, payload)
        render(out_dir, plots=False)
        cost = {r["metric"]: r["value"] for r in payload["rows"] if r["corruption"] == "all"}
        mean = next(
            r["value"] for r in payload["rows"] if r["corruption"] == "mean" and r["metric"] == "error"
        )
        console.log(
            f"{cell.method}: mean error {mean:.2f}%  ({cost['images_per_s']:.0f} img/s, "
            f"{cost['forward_per_image']:.2f} fwd/img, {cost['backward_per_image']:.2f} bwd/img)"
        )


def prepare_out_dir(out_dir: Path, identity: dict[str, Any], meta: dict[str, Any]) -> set[str]:
    """Create/check `out_dir` for `identity`; write config.json; return ids of cells already done."""
    cfg_path = out_dir / "config.json"
    ident = json.loads(json.dumps(identity, default=str))
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("identity") != ident:
            raise ConfigError(
                f"{out_dir} holds results of a different configuration; choose another --run-id"
            )
    atomic_write_json(
        cfg_path,
        {"identity": ident, **meta, "env": env_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S")},
    )
    return completed_cells(out_dir)


def run_experiment(cfg: RunConfig, console: Console | None = None) -> Path:
    """Run every (method, seed) cell of `cfg` not already done; return the results directory."""
    console = console or Console(stderr=True)
    cells = cfg.cells()
    for c in cells:
        validate_cell(c)
    device = select_device(cfg.exec.device)  # fail before any data is generated
    fallback = data_fallback_notice(cells)
    if fallback:
        console.print(f"warning: {fallback}", style="bold yellow", markup=False, highlight=False)
    for c in {(c.model, c.model_path, c.arch): c for c in cells}.values():
        # a mismatched local weights file fails here, before any data; a model still to be
        # downloaded loads later, after the (cheap) data checks
        if c.model_path is not None or cell_model_name(c.dataset, c.model) in SHIPPED:
            source_model(c, device)
    data = domain_data(cells[0], cfg.exec.cache_dir, console.log)
    for c in cells:  # corruption names and scenario options (e.g. --delta) fail here, before corrupting
        build_cell_stream(c, cfg.exec, console.log)
    identity = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("methods", "seeds", "overrides", "out", "run_id", "exec")
        and not (k == "subset" and v is None)  # added later: absent keeps older run ids valid
    }
    identity["data_source"] = data.describe()
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    run_id = cfg.run_id or f"{cfg.dataset}_{cfg.scenario}_s{cfg.severity}_b{cfg.batch_size}_{digest}"
    out_dir = Path(cfg.out) / run_id
    meta = {
        "config": dataclasses.asdict(cfg),
        "data_description": data.describe(),
        "model": cfg.model_path or cfg.model or DEFAULT_MODELS[cfg.dataset],
        "seeds": cfg.seeds,
        "methods": expand_methods(cfg.methods),
        # is bf16 fast on this device (what amp=bf16 / amp=auto do here; testtime.precision)
        "precision": precision_record(device),
    }
    if fallback:
        meta["data_fallback"] = fallback
    new = not out_dir.exists()
    done = prepare_out_dir(out_dir, identity, meta)
    if cfg.exec.device != str(device):
        console.log(f"device: {device} (--device {cfg.exec.device})")
    todo = [c for c in cells if c.cell_id not in done]
    if len(todo) < len(cells):
        console.log(f"resuming {out_dir}: {len(cells) - len(todo)} of {len(cells)} runs already done")
    try:
        run_cells_sequential(todo, with_checkpoints(cfg.exec, out_dir), out_dir, console)
    except BaseException:
        if new:
            discard_if_empty(out_dir)
        raise
    render(out_dir, plots=True)
    return out_dir


def discard_if_empty(out_dir: Path) -> bool:
    """Remove a results directory that holds nothing but its config.json (a run that failed or was
    interrupted before its first result or progress snapshot), so no empty run is left behind."""
    out_dir = Path(out_dir)
    kept = [p for p in out_dir.rglob("*") if p.is_file() and p != out_dir / "config.json"]
    if kept:
        return False
    (out_dir / "config.json").unlink(missing_ok=True)
    for d in sorted((p for p in out_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    out_dir.rmdir()
    return True


def print_error_table(out_dir: Path, console: Console) -> None:
    """Per-corruption error table of a results directory (and per-round errors), in the terminal."""
    rows = load_rows(out_dir)
    for metric in ("error", "round_error"):
        _print_metric_table(
            [r for r in rows if r["metric"] == metric and r["corruption"] != "all"], out_dir, console
        )


def _print_metric_table(rows: list[dict[str, Any]], out_dir: Path, console: Console) -> None:
    with_model = several_models(rows)
    groups = list(dict.fromkeys(group_label(r, with_model) for r in rows))
    for group in groups:
        sub = [r for r in rows if group_label(r, with_model) == group]
        corrs = [*dict.fromkeys(r["corruption"] for r in sub if r["corruption"] != "mean"), "mean"]
        methods = list(dict.fromkeys(r["method"] for r in sub))
        vals: dict[tuple[str, str], list[float]] = {}
        for r in sub:
            vals.setdefault((r["method"], r["corruption"]), []).append(float(r["value"]))
        kind = "error %" if sub[0]["metric"] == "error" else "error % per round"
        t = Table(title=f"{kind} — {group}")  # the path is printed after, unbroken
        t.add_column("domain")
        for m in methods:
            t.add_column(m, justify="right")
        for c in corrs:
            cells = [vals.get((m, c)) for m in methods]
            if c == "mean":
                t.add_section()
            t.add_row(
                c,
                *[f"{sum(v) / len(v):.1f}" if v else "-" for v in cells],
                style="bold" if c == "mean" else None,
            )
        console.print(t)
