"""Command-line interface: `testtime run | methods | scenarios | models | train-source | report`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from testtime.errors import TestTimeError

EXIT_USAGE = 2

EMBEDDED_N_PER_DOMAIN = 1000  # images per corruption in the no-argument embedded run


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


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
    from testtime.bench.experiment import ExecOptions, RunConfig, print_error_table, run_experiment

    scen_opts = {
        k: getattr(args, k) for k in ("delta", "rounds", "imbalance_ratio", "unknown", "unknown_ratio")
    }
    cfg = RunConfig(
        methods=_split(args.method) or ["source", "bn", "tent"],
        dataset=args.dataset,
        scenario=args.scenario,
        scenario_options={k: str(v) for k, v in scen_opts.items() if v is not None},
        severity=args.severity,
        batch_size=1 if args.scenario == "batch_size_1" else args.batch_size,  # recorded as run
        data=args.data,
        cifar10c=args.cifar10c,
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
        exec=ExecOptions(device=args.device, threads=args.threads, cache_dir=args.cache_dir),
    )
    out_dir = run_experiment(cfg, console)
    print_error_table(out_dir, Console())
    console.print(f"results: {out_dir}/ (results.csv, summary.md, trace.csv, config.json)")
    return 0


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    from testtime.adapt.config import config_table
    from testtime.adapt.registry import get_method, list_methods

    t = Table(title="registered methods")
    t.add_column("name")
    t.add_column("paper")
    t.add_column("min batch")
    t.add_column("options (defaults)" if args.verbose else "summary")
    for name in list_methods():
        cls = get_method(name)
        if args.verbose:
            opts = ", ".join(f"{n}={d}" for n, _, d in config_table(cls.Config()))
        else:
            opts = (cls.__doc__ or "").strip().splitlines()[0]
        t.add_row(name, cls.paper, str(cls.min_batch_size), opts)
    Console().print(t)
    return 0


def cmd_scenarios(args: argparse.Namespace, console: Console) -> int:
    from testtime.data.streams import list_scenarios

    t = Table(title="scenarios")
    t.add_column("name")
    t.add_column("description")
    for k, v in list_scenarios().items():
        t.add_row(k, v)
    Console().print(t)
    return 0


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    from testtime.models.zoo import ARCHS, SHIPPED

    t = Table(title="shipped source models")
    for c in ("name", "arch", "dataset", "sha256", "description"):
        t.add_column(c)
    for m in SHIPPED.values():
        t.add_row(m.name, m.arch, m.dataset, m.sha256[:12] + "…", m.description)
    Console().print(t)
    Console().print(f"architectures: {', '.join(ARCHS)}")
    return 0


def cmd_train_source(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from testtime.data.cifar import load_cifar10
    from testtime.models.train import TrainConfig, train_source

    cfg = TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        bf16=not args.no_bf16,
        threads=args.threads,
    )
    train = load_cifar10("train", args.data)
    test = load_cifar10("test", args.data)
    console.log(f"training {cfg.arch} on {train.source} ({len(train)} images), {cfg.epochs} epochs")
    train_source(
        cfg, (train.x, train.y), (test.x, test.y.astype(np.int64)), args.out, stop_after=args.stop_after
    )
    console.print(f"weights: {args.out}/{cfg.arch}.pt  log: {args.out}/train_log.json")
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from testtime.bench.experiment import ExecOptions, print_error_table
    from testtime.bench.suites import SUITES, SuiteArgs, run_suite

    if args.list or not args.suite:
        t = Table(title="benchmark suites")
        t.add_column("suite")
        t.add_column("description")
        for s in SUITES.values():
            t.add_row(s.name, " ".join(s.description.split()))
        Console().print(t)
        return 0
    sargs = SuiteArgs(seeds=_seeds(args.seed), data=args.data, methods=_split(args.method) or None)
    opts = ExecOptions(device=args.device, threads=args.threads, cache_dir=args.cache_dir)
    out_dir = run_suite(
        args.suite, sargs, args.out, opts, jobs=args.jobs, backend=args.backend, console=console
    )
    print_error_table(Path(out_dir), Console())
    console.print(f"results: {out_dir}/ (results.csv, summary.md, plots)")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from testtime.bench.experiment import print_error_table
    from testtime.bench.report import render

    path = render(Path(args.results_dir), plots=not args.no_plots)
    print_error_table(Path(args.results_dir), Console())
    console.print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
        "for every registered method (default: source,bn,tent)",
    )
    r.add_argument("--dataset", default="cifar10", help="cifar10 (CIFAR-10-C), mnist_usps or usps_mnist")
    r.add_argument("--scenario", "-s", default="continual", help="see `testtime scenarios`")
    r.add_argument(
        "--delta", type=float, help="Dirichlet concentration of correlated scenarios (default 0.1)"
    )
    r.add_argument("--rounds", type=int, help="repetitions of the sequence in long_horizon (default 10)")
    r.add_argument("--imbalance-ratio", type=float, help="imbalanced_label_shift odds (default 500000)")
    r.add_argument(
        "--unknown", choices=["mnist", "noise"], help="open_set unknown-class images (default mnist)"
    )
    r.add_argument("--unknown-ratio", type=float, help="open_set fraction of unknown samples (default 0.5)")
    r.add_argument("--severity", type=int, default=5, help="corruption severity 1..5")
    r.add_argument("--batch-size", "-b", type=int, default=200)
    r.add_argument(
        "--data",
        default="embedded",
        help="clean CIFAR-10: 'embedded' (2,000 test images shipped in the package), 'auto' "
        "(full set from $TESTTIME_DATA or ../shared/data if found), or a path to an npz / "
        "cifar-10-batches-py directory",
    )
    r.add_argument(
        "--cifar10c", help="directory of the official CIFAR-10-C .npy files (instead of generating)"
    )
    r.add_argument("--corruptions", action="append", help="subset of corruptions, comma-separated")
    r.add_argument(
        "--n-per-domain",
        type=int,
        help=f"use only this many images per corruption (default: {EMBEDDED_N_PER_DOMAIN} of the embedded "
        "2,000, which keeps the default run under 3 minutes on 2 CPU cores; all images otherwise)",
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
    r.add_argument("--model", help="shipped model (see `testtime models`; default: the dataset's)")
    r.add_argument("--model-path", help="weights file to load instead of a shipped model (needs --arch)")
    r.add_argument("--arch", help="architecture for --model-path")
    r.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
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
    t.add_argument("--data", help="CIFAR-10 npz or cifar-10-batches-py directory (default: search)")
    t.add_argument("--arch", default="resnet26")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--no-bf16", action="store_true", help="train in float32 (slower on CPU)")
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
    bn.add_argument("--out", default="results/bench", help="results root; the suite writes to OUT/SUITE")
    bn.add_argument("--jobs", "-j", type=int, default=1, help="parallel worker processes (local backend)")
    bn.add_argument("--backend", default="local", choices=["local"], help="where cells run")
    bn.add_argument("--device", default="cpu")
    bn.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / jobs)")
    bn.add_argument("--cache-dir", help="where generated corruptions are cached")
    bn.set_defaults(func=cmd_bench)

    rp = sub.add_parser("report", help="re-render tables and plots of a results directory")
    rp.add_argument("results_dir")
    rp.add_argument("--no-plots", action="store_true")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
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
