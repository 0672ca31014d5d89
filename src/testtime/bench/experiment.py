"""`testtime run`: methods x seeds on one scenario, resumable, with results written atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from testtime.adapt.registry import adapt, get_method, list_methods
from testtime.bench.report import load_rows, render
from testtime.bench.runner import Cell, completed_cells, run_stream, write_cell
from testtime.data.cifar import CIFAR10C_CORRUPTIONS, ImageSet, load_cifar10, load_embedded_cifar10
from testtime.data.streams import Cifar10CFiles, CorruptedDataset, StreamSpec, build_stream, list_scenarios
from testtime.errors import ConfigError
from testtime.models.zoo import DEFAULT_MODEL, load_model
from testtime.utils import atomic_write_json, env_info, seed_everything


@dataclass
class RunConfig:
    """Everything that defines a run; recorded in config.json."""

    methods: list[str] = field(default_factory=lambda: ["source", "bn", "tent"])
    scenario: str = "continual"
    severity: int = 5
    batch_size: int = 200
    data: str = "embedded"  # "embedded", "auto" (full set if found, else embedded) or a path
    cifar10c: str | None = None  # directory of the official CIFAR-10-C .npy files
    corruptions: list[str] = field(default_factory=lambda: list(CIFAR10C_CORRUPTIONS))
    n_per_domain: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    corruption_seed: int = 0
    model: str = DEFAULT_MODEL
    model_path: str | None = None
    arch: str | None = None
    device: str = "cpu"
    threads: int = 0
    overrides: dict[str, str] = field(default_factory=dict)
    out: str = "results"
    run_id: str | None = None
    cache_dir: str | None = None

    def identity(self) -> dict[str, Any]:
        """The fields that change results (not where they are written)."""
        d = dataclasses.asdict(self)
        for k in ("out", "run_id", "cache_dir", "threads", "device", "methods", "seeds"):
            d.pop(k)
        return d


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    return dev


def load_clean(data: str) -> ImageSet:
    if data == "embedded":
        return load_embedded_cifar10()
    if data == "auto":
        from testtime.data.cifar import find_cifar10

        return load_cifar10("test") if find_cifar10() is not None else load_embedded_cifar10()
    return load_cifar10("test", data)


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


def validate(cfg: RunConfig) -> None:
    cfg.methods = expand_methods(cfg.methods)
    if cfg.scenario not in list_scenarios():
        raise ConfigError(f"unknown scenario {cfg.scenario!r}; known: {', '.join(list_scenarios())}")
    if not cfg.seeds:
        raise ConfigError("no seed given")
    known = set().union(*({f.name for f in dataclasses.fields(get_method(m).Config)} for m in cfg.methods))
    unknown = sorted(set(cfg.overrides) - known)
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} belong to none of the methods {', '.join(cfg.methods)}"
        )


def run_experiment(cfg: RunConfig, console: Console | None = None) -> Path:
    """Run every (method, seed) cell not already done; return the results directory."""
    console = console or Console(stderr=True)
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    clean = load_clean(cfg.data)
    source = (
        Cifar10CFiles(cfg.cifar10c, clean)
        if cfg.cifar10c
        else CorruptedDataset(
            clean, seed=cfg.corruption_seed, cache_dir=cfg.cache_dir, progress=lambda s: console.log(s)
        )
    )
    ident = {**cfg.identity(), "data_source": source.describe()}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    run_id = cfg.run_id or f"{cfg.scenario}_s{cfg.severity}_b{cfg.batch_size}_{digest}"
    out_dir = Path(cfg.out) / run_id
    cfg_path = out_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("identity") != json.loads(json.dumps(ident)):
            raise ConfigError(
                f"{out_dir} holds results of a different configuration; choose another --run-id"
            )
    done = completed_cells(out_dir)
    meta = {
        "identity": ident,
        "config": dataclasses.asdict(cfg),
        "data_description": source.describe(),
        "model": cfg.model_path or cfg.model,
        "seeds": cfg.seeds,
        "env": env_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(cfg_path, meta)
    cells = []
    for seed in cfg.seeds:
        for m in cfg.methods:
            ov = method_overrides(m, cfg.overrides)
            cells.append(Cell(m, cfg.scenario, cfg.severity, seed, cfg.batch_size, tuple(sorted(ov.items()))))
    todo = [c for c in cells if c.cell_id not in done]
    if len(todo) < len(cells):
        console.log(f"resuming {out_dir}: {len(cells) - len(todo)} of {len(cells)} runs already done")
    base_model = load_model(cfg.model, cfg.model_path, cfg.arch).to(device, memory_format=torch.channels_last)
    for cell in todo:
        spec = StreamSpec(
            data=source,
            corruptions=tuple(cfg.corruptions),
            severity=cfg.severity,
            batch_size=cfg.batch_size,
            seed=cell.seed,
            n_per_domain=cfg.n_per_domain,
        )
        stream = build_stream(cfg.scenario, spec)
        # materialise corrupted data before timing starts
        for d in stream.domains:
            source.get(d)
        seed_everything(cell.seed)
        adapted = adapt(base_model, cell.method, seed=cell.seed, **dict(cell.overrides)).to(device)
        with Progress(
            TextColumn(f"[bold]{cell.method}[/] {cell.scenario} seed {cell.seed}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("err {task.fields[err]:5.1f}%"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("run", total=len(stream), err=float("nan"))

            def advance(_: int, err: float, task=task) -> None:
                progress.update(task, advance=1, err=err)

            res = run_stream(adapted, stream, on_batch=advance)
        write_cell(out_dir, cell, res, adapted.describe())
        render(out_dir, plots=False)
        console.log(
            f"{cell.method}: mean error {res.mean['error']:.2f}%  "
            f"({res.cost['images_per_s']:.0f} img/s, {res.cost['backward_per_image']:.2f} bwd/img)"
        )
    render(out_dir, plots=True)
    return out_dir


def print_error_table(out_dir: Path, console: Console) -> None:
    """Per-corruption error table of a results directory, in the terminal."""
    rows = [r for r in load_rows(out_dir) if r["metric"] == "error" and r["corruption"] != "all"]
    corrs = [*dict.fromkeys(r["corruption"] for r in rows if r["corruption"] != "mean"), "mean"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    vals: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        vals.setdefault((r["method"], r["corruption"]), []).append(float(r["value"]))
    t = Table(title=f"error % — {out_dir}", show_lines=False)
    t.add_column("method")
    for c in corrs:
        t.add_column(c.split("_")[0][:8], justify="right")
    for m in methods:
        cells = [vals.get((m, c)) for c in corrs]
        t.add_row(m, *[f"{sum(v) / len(v):.1f}" if v else "-" for v in cells])
    console.print(t)
