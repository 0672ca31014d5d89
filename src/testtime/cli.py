"""Command-line interface: `testtime run`, listings, `train-source`, `bench`, `report`, `serve`, `serve-check`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from testtime.errors import TestTimeError

if TYPE_CHECKING:
    from testtime.bench.experiment import ExecOptions

EXIT_USAGE = 2

EMBEDDED_N_PER_DOMAIN = 1000  # images per corruption in the no-argument embedded run


CHECKPOINT_HELP = (
    "seconds of work between progress snapshots of a running cell (in RESULTS/partial/; an interrupted "
    "run resumes from the last one); -1: none"
)


THREADS_HELP = (
    "torch CPU threads (0: auto, half of torch's default of one per physical core, at least 1, or "
    "$OMP_NUM_THREADS; more threads than free cores make small batches many times slower)"
)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` only where the help text does not already state a default and there
    is one to state (not None/False), so `--help` never shows `(default 0.1) (default: None)`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or not action.option_strings
        ):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the defaults formatter above, and errors that list the valid options.

    Sub-commands are built with this class too (argparse uses the parent's class), so an unknown
    option of `testtime run` names the options `run` takes, with the closest match first.
    """

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("formatter_class") is argparse.ArgumentDefaultsHelpFormatter:
            kwargs["formatter_class"] = DefaultsHelpFormatter
        super().__init__(*args, **kwargs)

    def _command_parser(self, ns: argparse.Namespace) -> Parser:
        """The (sub-)parser of the command named in `ns`, e.g. the `scale solve` parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
                if isinstance(chosen, Parser):
                    return chosen._command_parser(ns)
        return self

    def options_hint(self, unknown: Sequence[str]) -> str:
        import difflib

        valid = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
        close = [
            m
            for u in unknown
            if u.startswith("-")
            for m in difflib.get_close_matches(u.split("=")[0], valid, n=1, cutoff=0.6)
        ]
        hint = f"did you mean {', '.join(dict.fromkeys(close))}? " if close else ""
        return f"{hint}valid options of `{self.prog}`: {', '.join(valid)}"

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            target = self._command_parser(ns)
            target.error(f"unrecognized arguments: {' '.join(extras)}\n{target.options_hint(extras)}")
        return ns


def _exec_options(args: argparse.Namespace) -> ExecOptions:
    """How cells run, from the options `run` and `bench` share."""
    from testtime.bench.experiment import ExecOptions

    return ExecOptions(
        device=args.device,
        threads=args.threads,
        cache_dir=args.cache_dir,
        checkpoint_every=args.checkpoint_every,
    )


def _threads(requested: int, console: Console, jobs: int = 1) -> int:
    """`--threads`: as given, or for 0 (auto) `auto_threads()` shared among `jobs` workers."""
    if requested:  # a negative count is refused with the other inputs
        cores = os.cpu_count() or 1
        if requested > 0 and requested * max(1, jobs) > cores:
            console.log(
                f"[yellow]warning: --threads {requested} per worker x --jobs {jobs} = "
                f"{requested * max(1, jobs)} threads on {cores} cores: oversubscribed, each cell runs "
                f"several times slower; give --threads {max(1, cores // max(1, jobs))} or 0 (auto)"
            )
        return requested
    from testtime.device import auto_threads

    return max(1, auto_threads() // max(1, jobs))


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def _method_names(values: list[str] | None) -> list[str]:
    """Comma-separated method names, `default` resolved to the recipe it means (results record it)."""
    from testtime.adapt.registry import resolve_method

    return [resolve_method(v) for v in _split(values)]


def _seeds(values: list[str] | None) -> list[int]:
    from testtime.errors import ConfigError

    try:
        return [int(v) for v in _split(values)]
    except ValueError:
        raise ConfigError(
            f"--seed takes whole numbers, comma-separated; got {','.join(values or [])!r}"
        ) from None


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from testtime.adapt.config import parse_overrides
    from testtime.bench.experiment import RunConfig, print_error_table, run_experiment

    args.threads = _threads(args.threads, console)
    scen_opts = {
        k: getattr(args, k)
        for k in ("delta", "levels", "rounds", "imbalance_ratio", "unknown", "unknown_ratio")
    }
    cfg = RunConfig(
        methods=_method_names(args.method) or ["source", "bn", "tent"],
        dataset=args.dataset,
        scenario=args.scenario,
        scenario_options={k: str(v) for k, v in scen_opts.items() if v is not None},
        severity=args.severity,
        batch_size=1 if args.scenario == "batch_size_1" else args.batch_size,  # recorded as run
        data=args.data,
        cifar10c=args.cifar10c,
        subset=args.subset,
        corruptions=_split(args.corruptions) or None,
        n_per_domain=args.n_per_domain
        if args.n_per_domain is not None or args.data != "embedded" or args.dataset != "cifar10"
        else EMBEDDED_N_PER_DOMAIN,
        seeds=_seeds(args.seed) or [0],
        corruption_seed=args.corruption_seed,
        model=args.model,
        model_path=args.model_path,
        arch=args.arch,
        overrides=parse_overrides(args.option),
        source_samples=args.source_samples,
        out=args.out,
        run_id=args.run_id,
        exec=_exec_options(args),
    )
    out_dir = run_experiment(cfg, console)
    print_error_table(out_dir, Console())
    console.print(
        f"results: {out_dir}/ (results.csv, summary.md, trace.csv, config.json)", soft_wrap=True, markup=False
    )
    return 0


def print_table(table: Table, console: Console | None = None) -> None:
    """Print `table` wrapping long values (and folding words wider than their column) instead of
    cutting them off with an ellipsis, whatever the terminal width."""
    for col in table.columns:
        col.overflow = "fold"
        col.no_wrap = False
    (console or Console()).print(table)


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    from testtime.adapt.config import config_table
    from testtime.adapt.registry import get_method, list_methods

    t = Table(title="registered methods")
    t.add_column("name")
    t.add_column("paper")
    t.add_column("min batch")
    t.add_column("options (defaults)" if args.verbose else "summary")
    if args.verbose:
        t.add_column("what adapts (BatchNorm / GroupNorm / LayerNorm)")
    for name in list_methods():
        cls = get_method(name)
        if args.verbose:
            opts = ", ".join(f"{n}={d}" for n, _, d in config_table(cls.Config()))
        else:
            opts = (cls.__doc__ or "").strip().splitlines()[0]
        norms = [cls.norm_support.summary() if cls.norm_support else "not stated"] if args.verbose else []
        t.add_row(name, cls.paper, str(cls.min_batch_size), opts, *norms)
    print_table(t)
    return 0


def cmd_scenarios(args: argparse.Namespace, console: Console) -> int:
    from testtime.data.streams import list_scenarios

    t = Table(title="scenarios")
    t.add_column("name")
    t.add_column("description")
    for k, v in list_scenarios().items():
        t.add_row(k, v)
    print_table(t)
    return 0


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    from testtime.models.zoo import ARCHS, SHIPPED, published_models

    t = Table(title="shipped source models")
    for c in ("name", "arch", "dataset", "sha256", "description"):
        t.add_column(c)
    for m in SHIPPED.values():
        t.add_row(m.name, m.arch, m.dataset, m.sha256[:12] + "…", m.description)
    print_table(t)
    p = Table(title="published models (downloaded and cached, or --model-path FILE)")
    p.add_column("name")
    p.add_column("description")
    for name, desc in published_models().items():
        p.add_row(name, desc)
    print_table(p)
    Console().print(f"architectures: {', '.join(ARCHS)}")
    return 0


def cmd_train_source(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from testtime.data.cifar import find_cifar10, load_cifar10
    from testtime.errors import ConfigError
    from testtime.models.train import check_config, config_for, train_source
    from testtime.models.zoo import ARCHS

    # every input is checked before 60,000 images are read
    if args.arch not in ARCHS:
        raise ConfigError(f"unknown architecture {args.arch!r}; known: {', '.join(sorted(ARCHS))}")
    for name, value, lo in (
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--seed", args.seed, 0),
        ("--threads", args.threads, 0),
        ("--stop-after", args.stop_after, 0),
    ):
        if value is not None and value < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {value}")
    if args.lr is not None and not (args.lr > 0 and args.lr < float("inf")):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    # the architecture's preset (testtime.models.train.PRESETS), then every flag given explicitly
    cfg = config_for(
        args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=not args.no_bf16,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        mix=args.mix,
        grad_clip=args.grad_clip,
    )
    check_config(cfg, flags=True)
    if find_cifar10(args.data) is None:  # an explicit --data that does not exist raises here
        raise ConfigError(
            "train-source needs the full CIFAR-10 (the 2,000 shipped test images are not a training set); "
            "pass --data PATH, set $TESTTIME_DATA, or download it with "
            "`python -c 'from testtime.data.cifar import download_cifar10; download_cifar10()'` "
            "(to ~/.cache/testtime/data, which is searched)"
        )
    cfg.threads = _threads(args.threads, console)
    train = load_cifar10("train", args.data)
    test = load_cifar10("test", args.data)
    console.log(f"training {cfg.arch} on {train.source} ({len(train)} images), {cfg.epochs} epochs")
    console.log(
        f"recipe: {cfg.optimizer} lr {cfg.lr:g} (batch {cfg.batch_size}), weight decay {cfg.weight_decay:g}, "
        f"{cfg.warmup_epochs} warm-up epochs, label smoothing {cfg.label_smoothing:g}, mix {cfg.mix}, "
        f"grad clip {cfg.grad_clip:g}"
    )
    train_source(
        cfg, (train.x, train.y), (test.x, test.y.astype(np.int64)), args.out, stop_after=args.stop_after
    )
    console.print(
        f"weights: {args.out}/{cfg.arch}.pt  log: {args.out}/train_log.json", soft_wrap=True, markup=False
    )
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from testtime.bench.experiment import print_error_table
    from testtime.bench.suites import SUITES, SuiteArgs, run_suite

    if args.list or not args.suite:
        t = Table(title="benchmark suites")
        t.add_column("suite")
        t.add_column("description")
        for s in SUITES.values():
            t.add_row(s.name, " ".join(s.description.split()))
        print_table(t)
        return 0
    sargs = SuiteArgs(
        seeds=_seeds(args.seed),
        data=args.data,
        methods=_method_names(args.method) or None,
        n_per_domain=args.n_per_domain,
    )
    if args.backend == "local":  # Ray workers choose theirs where they run
        args.threads = _threads(args.threads, console, jobs=args.jobs)
    opts = _exec_options(args)
    out_dir = run_suite(
        args.suite,
        sargs,
        args.out,
        opts,
        jobs=args.jobs,
        backend=args.backend,
        console=console,
        ray_address=args.ray_address,
    )
    print_error_table(Path(out_dir), Console())
    console.print(f"results: {out_dir}/ (results.csv, summary.md, plots)", soft_wrap=True, markup=False)
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from testtime.bench.experiment import print_error_table
    from testtime.bench.report import render_files

    out_dir = Path(args.results_dir)
    written = render_files(out_dir, plots=not args.no_plots)
    print_error_table(out_dir, Console())
    source = "cells/" if (out_dir / "cells").is_dir() else "results.csv"
    names = ", ".join(p.name for p in written)
    console.print(
        f"wrote in {out_dir}/ from {source}: {names}", soft_wrap=True, markup=False, highlight=False
    )
    return 0


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    import contextlib
    import logging

    import torch

    from testtime.adapt import adapt, get_method
    from testtime.adapt.config import parse_overrides
    from testtime.adapt.registry import resolve_method
    from testtime.device import select_device
    from testtime.errors import ConfigError
    from testtime.serve import (  # ConfigError naming testtime[serve] when FastAPI is missing
        bind_socket,
        create_app,
        load_served_model,
        run_server,
    )

    args.method = resolve_method(args.method)
    overrides = parse_overrides(args.option)
    if getattr(get_method(args.method), "requires_source_data", False):
        raise ConfigError(
            f"{args.method} needs source (training) images, which `testtime serve` does not load"
        )
    device = select_device(args.device)
    model, name, shape, classes = load_served_model(args.model, args.model_path, args.arch)
    adapted = adapt(model.to(device, memory_format=torch.channels_last), args.method, **overrides)
    app = create_app(
        adapted,
        model_name=name,
        input_shape=shape,
        class_names=classes,
        state_path=args.state,
        snapshot_interval_s=args.snapshot_interval,
        snapshot_every_batches=args.snapshot_every_batches,
        max_batch=args.max_batch,
        body_timeout_s=args.body_timeout,
        max_concurrent=args.max_concurrent,
    )
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    every = f" and every {args.snapshot_every_batches} batches" if args.snapshot_every_batches else ""
    state = f"; state {args.state}, snapshot every {args.snapshot_interval:g} s{every}" if args.state else ""
    console.print(
        f"serving {args.method} on {name} at {where}{state} (Ctrl-C stops)", soft_wrap=True, markup=False
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the signal after its shutdown
        run_server(app, sock, log_level=args.log_level)
    svc = app.state.service
    if args.state and not svc.snapshot_errors:
        console.print(f"stopped; adaptation state saved to {args.state}", soft_wrap=True, markup=False)
    elif args.state:
        console.print(
            f"stopped; WARNING: {svc.snapshot_errors} snapshot(s) to {args.state} failed (see the log)"
        )
        return 1
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def cmd_serve_check(args: argparse.Namespace, console: Console) -> int:
    from testtime.adapt.config import parse_overrides
    from testtime.adapt.registry import resolve_method
    from testtime.serve_check import CheckConfig, run_check  # ConfigError without testtime[serve]

    args.method = resolve_method(args.method)

    cfg = CheckConfig(
        method=args.method,
        model=args.model,
        overrides=parse_overrides(args.option),
        clients=args.clients,
        requests=args.requests,
        batch_size=args.batch_size,
        corruption=args.corruption,
        severity=args.severity,
        seed=args.seed,
        time_limit_s=args.time_limit,
        out=args.out,
    )
    res = run_check(cfg, log=console.log)
    t = Table(title=f"serve-check: {cfg.method} on {res['model']}, {cfg.clients} clients")
    t.add_column("measure")
    t.add_column("value", justify="right")
    lat, srv = res["client_latency_ms"], res["server_latency_ms"]
    for k, v in [
        ("requests ok / sent", f"{res['requests_ok']} / {cfg.requests}"),
        ("images", str(res["images"])),
        ("wall time (s)", f"{res['wall_s']:.2f}"),
        ("throughput (images/s)", f"{res['throughput_images_per_s']:.1f}"),
        ("throughput (requests/s)", f"{res['throughput_requests_per_s']:.2f}"),
        ("client latency p50 / p90 / p99 (ms)", " / ".join(_ms(lat[k]) for k in ("p50", "p90", "p99"))),
        ("server latency p50 / p90 / p99 (ms)", " / ".join(_ms(srv[k]) for k in ("p50", "p90", "p99"))),
        ("model time per batch p50 / p99 (ms)", " / ".join(_ms(res["model_ms"][k]) for k in ("p50", "p99"))),
        *((f"check: {k}", "PASS" if v else "FAIL") for k, v in res["checks"].items()),
    ]:
        t.add_row(k, v)
    print_table(t)
    console.print(f"{'all checks passed' if res['passed'] else 'CHECKS FAILED'}; wrote {res['path']}")
    return 0 if res["passed"] else 1


def _add_served_model(p: argparse.ArgumentParser, paths: bool = True) -> None:
    p.add_argument(
        "--method",
        "-m",
        default="tent",
        help="method name (see `testtime methods`; `default`: testtime's own recipe)",
    )
    p.add_argument(
        "--model",
        help="model name (see `testtime models`: shipped, robustbench:..., torchvision:..., timm:...; "
        "default: cifar10_resnet26, CIFAR-10)",
    )
    if paths:
        p.add_argument("--model-path", help="weights file to load instead of a shipped model (needs --arch)")
        p.add_argument("--arch", help="architecture for --model-path")
    p.add_argument(
        "--option",
        "-o",
        action="append",
        metavar="KEY=VALUE",
        help="override a method option, e.g. -o lr=0.0005 (see `testtime methods -v`)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="testtime",
        description="Test-time adaptation benchmark and tools. `testtime run` with no arguments runs "
        "Source, BN-adapt and Tent on the embedded CIFAR-10-C-style continual stream.",
    )
    from testtime import __version__

    p.add_argument("--version", action="version", version=f"testtime {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="adapt methods on a test stream and report metrics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument(
        "--method",
        "-m",
        action="append",
        help="method name(s), comma-separated or repeated; 'all' "
        "for every registered method; 'default' for testtime's own recipe (auto) (default: source,bn,tent)",
    )
    r.add_argument(
        "--dataset",
        default="cifar10",
        help="cifar10 (CIFAR-10-C), cifar100 (CIFAR-100-C), imagenet_c, mnist_usps or usps_mnist",
    )
    r.add_argument("--scenario", "-s", default="continual", help="see `testtime scenarios`")
    r.add_argument(
        "--delta",
        type=float,
        help="Dirichlet concentration of correlated scenarios (default 0.1; 0: sorted by class label)",
    )
    r.add_argument(
        "--levels",
        type=int,
        help="mixed scenarios: each corruption also at the levels-1 severities below --severity (default 1)",
    )
    r.add_argument("--rounds", type=int, help="repetitions of the sequence in long_horizon (default 10)")
    r.add_argument("--imbalance-ratio", type=float, help="imbalanced_label_shift odds (default 500000)")
    r.add_argument(
        "--unknown", choices=["mnist", "noise"], help="open_set unknown-class images (default mnist)"
    )
    r.add_argument("--unknown-ratio", type=float, help="open_set fraction of unknown samples (default 0.5)")
    r.add_argument("--severity", type=int, default=5, help="corruption severity 1..5")
    r.add_argument(
        "--batch-size",
        "-b",
        type=int,
        default=200,
        help="test images per batch (the method predicts and adapts once per batch)",
    )
    r.add_argument(
        "--data",
        default="embedded",
        help="clean CIFAR-10: 'embedded' (2,000 test images shipped in the package), 'auto' "
        "(full set from $TESTTIME_DATA or ../shared/data if found), or a path to an npz / "
        "cifar-10-batches-py directory; cifar100: the cifar-100-python directory; imagenet_c: the "
        "ImageNet-C directory (<corruption>/<severity>/<wnid>/*.JPEG)",
    )
    r.add_argument(
        "--corrupted",
        "--cifar10c",
        "--cifar100c",
        dest="cifar10c",
        metavar="DIR",
        help="directory of the official CIFAR-10-C / CIFAR-100-C .npy files (<corruption>.npy, "
        "labels.npy) instead of generating the corruptions",
    )
    r.add_argument(
        "--subset",
        metavar="FILE",
        help="imagenet_c: list file of relative image paths <wnid>/<file> to use (e.g. RobustBench's "
        "5,000-image imagenet_test_image_ids.txt; default: every image)",
    )
    r.add_argument(
        "--corruptions",
        action="append",
        help="subset of corruptions, comma-separated; also the held-out validation corruptions "
        "speckle_noise,gaussian_blur,spatter,saturate (never in the default streams)",
    )
    r.add_argument(
        "--n-per-domain",
        type=int,
        help=f"use only this many images per corruption (default: {EMBEDDED_N_PER_DOMAIN} of the embedded "
        "2,000 for --data embedded; all images otherwise)",
    )
    r.add_argument(
        "--source-samples",
        type=int,
        default=0,
        help="clean training images given to every method (e.g. for EATA's Fisher, AdaNPC's memory); "
        "methods that cannot run without them (CAFA) get 2000 by default",
    )
    r.add_argument("--seed", action="append", help="seed(s), comma-separated (default 0)")
    r.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruption generator")
    r.add_argument(
        "--model",
        help="model name (see `testtime models`): shipped, robustbench:<dataset>:<id>, "
        "torchvision:<arch> or timm:<model> (default: the dataset's)",
    )
    r.add_argument(
        "--model-path",
        help="weights file: for a robustbench/torchvision/timm --model instead of downloading; "
        "otherwise loaded into --arch",
    )
    r.add_argument("--arch", help="architecture for --model-path")
    r.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda[:N] or mps")
    r.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    r.add_argument("--checkpoint-every", type=float, default=600.0, help=CHECKPOINT_HELP)
    r.add_argument(
        "--option",
        "-o",
        action="append",
        metavar="KEY=VALUE",
        help="override a method option, e.g. -o lr=0.0005 (see `testtime methods -v`)",
    )
    r.add_argument("--out", default="results", help="results root directory")
    r.add_argument(
        "--run-id",
        help="results subdirectory (default: derived from the configuration; "
        "rerunning the same configuration resumes)",
    )
    r.add_argument("--cache-dir", help="where generated corruptions are cached")
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("methods", help="list registered methods")
    m.add_argument("--verbose", "-v", action="store_true", help="show every option and its default")
    m.set_defaults(func=cmd_methods)
    sub.add_parser("scenarios", help="list test-stream scenarios").set_defaults(func=cmd_scenarios)
    sub.add_parser("models", help="list shipped source models").set_defaults(func=cmd_models)

    t = sub.add_parser(
        "train-source",
        help="train a source model on the CIFAR-10 training split",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument(
        "--data",
        help="CIFAR-10 npz or cifar-10-batches-py directory (default: search $TESTTIME_DATA, "
        "../shared/data and ~/.cache/testtime/data)",
    )
    t.add_argument("--arch", default="resnet26", help="architecture to train (see `testtime models`)")
    t.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (cosine schedule over all of them); default: 100 for vit_tiny_p4, else 60",
    )
    t.add_argument("--batch-size", "-b", type=int, default=128, help="training images per optimizer step")
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, after the warm-up (vit_tiny_p4: 5 epochs, else 2); default: 1e-3 for "
        "vit_tiny_p4 (at batch 128, not rescaled with --batch-size), else 0.1",
    )
    t.add_argument(
        "--optimizer",
        default=None,
        help="sgd (Nesterov, momentum 0.9) or adamw; default: adamw for vit_tiny_p4, else sgd",
    )
    t.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay of weight tensors (ndim > 1; none on biases and norms); "
        "default: 0.05 for vit_tiny_p4, else 5e-4",
    )
    t.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        help="label smoothing of the cross-entropy, in [0, 1); default: 0.1 for vit_tiny_p4, else 0",
    )
    t.add_argument(
        "--mix",
        default=None,
        help="none, or mixup_cutmix (DeiT: every batch mixup alpha 0.8 or CutMix alpha 1.0, 50/50); "
        "default: mixup_cutmix for vit_tiny_p4, else none",
    )
    t.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        help="clip the global gradient norm to this (0: off); default: 1.0 for vit_tiny_p4, else 0",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation, order and augmentation")
    t.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    t.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in float32 always (default: bf16 autocast where this CPU runs bf16 fast, else float32)",
    )
    t.add_argument(
        "--stop-after", type=int, default=None, help="end after this epoch (resume later from the checkpoint)"
    )
    t.add_argument("--out", default="runs/source", help="checkpoint/output directory (resumes if present)")
    t.set_defaults(func=cmd_train_source)

    bn = sub.add_parser(
        "bench",
        help="run a benchmark suite (resumable grid of methods x scenarios x seeds)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bn.add_argument("--suite", help="suite name (see --list)")
    bn.add_argument("--list", action="store_true", help="list the suites")
    bn.add_argument("--seed", action="append", help="seeds, comma-separated (default: the suite's)")
    bn.add_argument("--method", "-m", action="append", help="restrict to these methods")
    bn.add_argument("--data", default="auto", help="clean CIFAR-10 for full-data suites: auto or a path")
    bn.add_argument(
        "--n-per-domain",
        type=int,
        help="at most this many images per domain in every cell: a smaller, quicker suite, written to "
        "OUT/SUITE_nN (default: the suite's own)",
    )
    bn.add_argument("--out", default="results/bench", help="results root; the suite writes to OUT/SUITE")
    bn.add_argument("--jobs", "-j", type=int, default=1, help="parallel workers (pool, or local Ray CPUs)")
    bn.add_argument(
        "--backend",
        default="local",
        choices=["local", "ray"],
        help="where cells run: a local process pool, or one Ray task per cell (needs testtime[ray])",
    )
    bn.add_argument(
        "--ray-address",
        help="Ray cluster for --backend ray (None: $RAY_ADDRESS if set, else start a local Ray instance)",
    )
    bn.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda[:N] or mps")
    bn.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per worker (0: auto, half of the physical cores, at least 1, shared "
        "among the --jobs workers)",
    )
    bn.add_argument("--cache-dir", help="where generated corruptions are cached")
    bn.add_argument("--checkpoint-every", type=float, default=600.0, help=CHECKPOINT_HELP)
    bn.set_defaults(func=cmd_bench)

    sv = sub.add_parser(
        "serve",
        help="HTTP inference service that adapts on every request (needs testtime[serve])",
        description="Serve an adapted model over HTTP (FastAPI + uvicorn). Every POST /predict is one "
        "batch: the model predicts and adapts, one request at a time. Endpoints: POST /predict "
        "(multipart PNG/JPEG files, or a .npy array as application/x-npy), POST /reset, GET /health, "
        "GET /metrics (Prometheus text format), GET /metrics.json. No authentication: keep --host on "
        "loopback unless a proxy guards it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_served_model(sv)
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    sv.add_argument(
        "--state",
        help="adaptation state file: loaded at start if present (a damaged file, or one that does not "
        "fit, stops the start and is left as it is), saved periodically and at shutdown; locked "
        "(STATE.lock) so that only one server uses it",
    )
    sv.add_argument(
        "--snapshot-interval",
        type=float,
        default=60.0,
        help="seconds between state snapshots (0: none periodic; always at shutdown)",
    )
    sv.add_argument(
        "--snapshot-every-batches",
        type=int,
        default=0,
        metavar="N",
        help="also snapshot after every N adapted batches, before answering (1: an answered batch is "
        "never lost, even to kill -9; 0: off)",
    )
    sv.add_argument("--max-batch", type=int, default=1024, help="most images accepted in one request")
    sv.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request body (then 408 and the connection is closed)",
    )
    sv.add_argument(
        "--max-concurrent",
        type=int,
        default=64,
        help="most POST /predict requests in progress (uploading or queued); more get 503 at once",
    )
    sv.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda[:N] or mps")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)

    sc = sub.add_parser(
        "serve-check",
        help="load-test `testtime serve` on loopback and verify that updates are serialised",
        description="Start the service in-process on 127.0.0.1 (ephemeral port), send REQUESTS POSTs "
        "from CLIENTS concurrent threads (each a random batch of corrupted embedded CIFAR-10 test "
        "images), then check: one response per request (echoed X-Request-Id), seq numbers exactly "
        "1..REQUESTS, the adapted-batch counter, and that replaying the batches in seq order on a "
        "fresh model gives a bit-identical state. Prints a table, writes OUT/serve_check.json; "
        "exit code 1 if a check fails.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_served_model(sc, paths=False)
    sc.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    sc.add_argument("--requests", type=int, default=400, help="total POST /predict requests")
    sc.add_argument("--batch-size", "-b", type=int, default=16, help="images per request")
    sc.add_argument("--corruption", default="gaussian_noise", help="CIFAR-10-C corruption of the images")
    sc.add_argument("--severity", type=int, default=5, help="corruption severity 1..5")
    sc.add_argument("--seed", type=int, default=0, help="seed of the corruption and the batch sampling")
    sc.add_argument("--time-limit", type=float, default=600.0, help="seconds before the clients stop")
    sc.add_argument("--out", default="results/serve-check", help="directory of serve_check.json")
    sc.set_defaults(func=cmd_serve_check)

    from testtime.scale.cli import add_parser as add_scale_parser

    add_scale_parser(sub)

    rp = sub.add_parser(
        "report",
        help="re-render tables and plots of a results directory",
        description="Rewrite summary.md, the tidy CSVs and the plots of a results directory from its "
        "cells/ (as `run` and `bench` leave it), or summary.md and the per-corruption plot from a "
        "results.csv alone (e.g. one downloaded from a benchmark).",
    )
    rp.add_argument("results_dir", help="a results directory (with cells/ or results.csv)")
    rp.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if args.command is None:  # bare `testtime`: the usage, not a 15,000-image run
        parser.print_help()
        print("testtime: error: no command given; start with `testtime run`", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args, console) or 0)
    except TestTimeError as e:
        print(f"testtime: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("testtime: interrupted (completed runs are saved; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
