"""Run methods over a test stream; collect metrics, traces and cost; write results atomically."""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from testtime.adapt.base import AdaptedModel
from testtime.bench.report import cell_setting
from testtime.data.streams import Stream
from testtime.errors import DataError
from testtime.metrics import MetricAccumulator, reliability_bins
from testtime.utils import atomic_torch_save, atomic_write_json, load_weights_only


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB); process-wide, so it only grows across methods."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


@dataclass
class StreamResult:
    """Metrics of one method on one stream."""

    per_domain: dict[str, dict[str, float]]
    mean: dict[str, float]
    trace: list[dict[str, Any]]
    cost: dict[str, float]
    counters: dict[str, int]
    resets: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_stream(
    adapted: AdaptedModel,
    stream: Stream,
    on_batch: Callable[[int, float], None] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: float = 600.0,
) -> StreamResult:
    """Feed every batch of `stream` to `adapted`; reset it at segment starts when the stream says so.

    With `checkpoint`, the progress (adaptation state, metrics so far, trace, timing) is written
    there atomically every `checkpoint_every` seconds of work (0: after every batch), and a run
    that finds the file resumes after its last batch with the same results as an uninterrupted
    one; the caller deletes the file once the result is safe.
    """
    accs = {i: MetricAccumulator() for i in range(len(stream.domains))}
    trace: list[dict[str, Any]] = []
    resets, seconds, start = 0, 0.0, 0
    if checkpoint is not None and checkpoint.is_file():
        start, seconds, resets = resume_progress(checkpoint, adapted, stream, accs, trace)
    device = next(iter(adapted.parameters()), torch.zeros(())).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    since_save = 0.0
    for b, batch in enumerate(stream):
        if b < start:
            if on_batch:
                on_batch(b, trace[b]["error"])
            continue
        if stream.reset_each_segment and batch.new_segment and batch.segment > 0:
            adapted.reset()
            resets += 1
        x, y = batch.x.to(device, non_blocking=True), batch.y
        sync()
        t0 = time.perf_counter()
        logits = adapted(x)
        sync()
        dt = time.perf_counter() - t0
        seconds += dt
        logits = logits.cpu()
        known = y >= 0
        wrong = logits.argmax(1)[known] != y[known]
        for k in np.unique(batch.domain_ids):
            m = torch.from_numpy(batch.domain_ids == k)
            accs[int(k)].update(logits[m], y[m])
        err = 100.0 * float(wrong.float().mean()) if len(wrong) else float("nan")
        first = int(batch.domain_ids[0])
        trace.append(
            {
                "batch": b,
                "segment": batch.segment,
                "domain": str(stream.domains[first]),
                "n": len(y),
                "error": err,
            }
        )
        since_save += dt
        if checkpoint is not None and since_save >= checkpoint_every and b + 1 < len(stream):
            save_progress(checkpoint, b + 1, adapted, stream, accs, trace, seconds, resets)
            since_save = 0.0
        if on_batch:
            on_batch(b, err)
    per_domain = {str(stream.domains[i]): a.summary() for i, a in accs.items() if a.n}
    keys = ["error", "nll", "ece", "brier"]
    keys += [k for k in ("auroc", "h_score") if any(k in d for d in per_domain.values())]
    shifted = {n: d for n, d in per_domain.items() if n != "clean"} or per_domain  # 'clean' is reported apart
    mean = {k: float(np.mean([d[k] for d in shifted.values() if k in d])) for k in keys}
    counters = adapted.counters()
    n = max(1, counters["images"])
    cost = {
        "seconds": seconds,
        "images_per_s": counters["images"] / seconds if seconds > 0 else float("nan"),
        "forward_per_image": counters["forward_images"] / n,
        "backward_per_image": counters["backward_images"] / n,
        "peak_rss_mb": peak_rss_mb(),
    }
    if device.type == "cuda":
        cost["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    conf = np.concatenate([np.concatenate(a.conf) for a in accs.values() if a.n])
    correct = np.concatenate([np.concatenate(a.correct) for a in accs.values() if a.n])
    rel = {k: np.nan_to_num(v).tolist() for k, v in reliability_bins(conf, correct).items()}
    extra: dict[str, Any] = {"reliability": rel, "guard_events": list(adapted.guard_events)}
    if stream.meta.get("rounds"):
        extra["round_error"] = round_errors(trace, len(stream.segments) // int(stream.meta["rounds"]))
    return StreamResult(per_domain, mean, trace, cost, counters, resets, extra=extra)


PROGRESS_VERSION = 1


def save_progress(
    path: Path,
    batches_done: int,
    adapted: AdaptedModel,
    stream: Stream,
    accs: dict[int, MetricAccumulator],
    trace: list[dict[str, Any]],
    seconds: float,
    resets: int,
) -> None:
    """Write a resumable snapshot of a stream run (see `run_stream`)."""
    state = {
        "version": PROGRESS_VERSION,
        "method": adapted.name,
        "n_batches": len(stream),
        "domains": [str(d) for d in stream.domains],
        "batches_done": batches_done,
        "seconds": seconds,
        "resets": resets,
        "trace": trace,
        "metrics": {i: a.state() for i, a in accs.items()},
        "adapted": adapted.state_dict(),
        "tally": dict(adapted.__dict__.get("tally") or {}),
        "guard_events": list(adapted.guard_events),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)


def resume_progress(
    path: Path,
    adapted: AdaptedModel,
    stream: Stream,
    accs: dict[int, MetricAccumulator],
    trace: list[dict[str, Any]],
) -> tuple[int, float, int]:
    """Load a snapshot written by `save_progress` into `adapted`, `accs` and `trace`; return
    (batches done, seconds, resets). A snapshot of another method or stream is refused."""
    state = load_weights_only(path, DataError, "unreadable progress file; delete it to start over")
    expect = {
        "version": PROGRESS_VERSION,
        "method": adapted.name,
        "n_batches": len(stream),
        "domains": [str(d) for d in stream.domains],
    }
    found = {k: state.get(k) for k in expect}
    if found != expect:
        raise DataError(f"{path}: progress of another run ({found} != {expect}); delete it to start over")
    adapted.load_state_dict(state["adapted"])
    for i, a in state["metrics"].items():
        accs[int(i)] = MetricAccumulator.from_state(a)
    trace.extend(state["trace"])
    tally = adapted.__dict__.get("tally")
    if tally is not None:
        tally.update(state["tally"])
    adapted.guard_events.extend(state["guard_events"])
    return int(state["batches_done"]), float(state["seconds"]), int(state["resets"])


def round_errors(trace: list[dict[str, Any]], segments_per_round: int) -> list[float]:
    """Error (%) of each repetition of a repeated sequence (long_horizon), weighted by batch size."""
    wrong: dict[int, float] = defaultdict(float)
    seen: dict[int, int] = defaultdict(int)
    for t in trace:
        if not math.isnan(t["error"]):
            r = t["segment"] // segments_per_round
            wrong[r] += t["error"] * t["n"]
            seen[r] += t["n"]
    return [wrong[r] / seen[r] for r in sorted(seen)]


# ----------------------------------------------------------------------------- cells & files
@dataclass(frozen=True)
class Cell:
    """One unit of work, fully specified: a method on a dataset's scenario with a seed.

    Two cells with equal fields give the same results (up to floating-point nondeterminism of
    the device); `cell_id` names its result file and is what resumption keys on.
    """

    method: str
    scenario: str
    seed: int = 0
    dataset: str = "cifar10"
    severity: int = 5
    batch_size: int = 200
    scenario_options: tuple[tuple[str, str], ...] = ()
    corruptions: tuple[str, ...] | None = None
    n_per_domain: int | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    data: str = "embedded"
    cifar10c: str | None = None  # directory of official CIFAR-10-C / CIFAR-100-C .npy files
    corruption_seed: int = 0
    model: str | None = None
    model_path: str | None = None
    arch: str | None = None
    source_samples: int = 0  # clean training images handed to the method (0: only if it needs them)
    subset: str | None = None  # imagenet_c: list file of the images to use (None: all)

    @property
    def cell_id(self) -> str:
        base = f"{self.dataset}__{self.scenario}__s{self.severity}__b{self.batch_size}__{self.method}__seed{self.seed}"
        extra = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("method", "scenario", "seed", "dataset", "severity", "batch_size")
            and v not in ((), None)
            and not (k == "source_samples" and v == 0)
        }
        if extra and extra != {"data": "embedded", "corruption_seed": 0}:
            h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()[:8]
            base += f"__{h}"
        return base


def tidy_rows(cell: Cell, res: StreamResult) -> list[dict[str, Any]]:
    """Rows (dataset, method, scenario, corruption, severity, seed, batch_size, metric, value, options,
    model): the columns of report.TIDY_COLUMNS."""
    rows = []
    base = {
        "dataset": cell.dataset,
        "method": cell.method,
        "scenario": cell.scenario,
        "seed": cell.seed,
        "batch_size": cell.batch_size,
        **cell_setting(asdict(cell)),
    }
    for dom, metrics in res.per_domain.items():
        corruption, _, sev = dom.partition("@")
        for k, v in metrics.items():
            rows.append(
                {**base, "corruption": corruption, "severity": int(sev or 0), "metric": k, "value": v}
            )
    for k, v in res.mean.items():
        rows.append({**base, "corruption": "mean", "severity": cell.severity, "metric": k, "value": v})
    rounds = res.extra.get("round_error", [])
    if rounds:  # long_horizon: error of each repetition, and their mean
        named = [*((f"round_{r + 1}", v) for r, v in enumerate(rounds)), ("mean", float(np.mean(rounds)))]
        for name, v in named:
            rows.append(
                {**base, "corruption": name, "severity": cell.severity, "metric": "round_error", "value": v}
            )
    extra = {**res.cost, **{f"n_{k}": v for k, v in res.counters.items()}, "resets": res.resets}
    extra.update({k: v for k, v in res.extra.items() if isinstance(v, (int, float))})
    for k, v in extra.items():
        rows.append({**base, "corruption": "all", "severity": cell.severity, "metric": k, "value": v})
    return rows


def cell_payload(cell: Cell, res: StreamResult, describe: dict[str, Any]) -> dict[str, Any]:
    """Everything persisted about a finished cell (JSON-serialisable)."""
    return {
        "cell": asdict(cell),
        "cell_id": cell.cell_id,
        "method": describe,
        "rows": tidy_rows(cell, res),
        "trace": res.trace,
        "extra": res.extra,
    }


PARTIAL_DIR = "partial"  # in a results directory: progress snapshots of unfinished cells


def write_payload(out_dir: Path, payload: dict[str, Any]) -> Path:
    """Persist one finished cell atomically (the unit of resumption); drop its progress snapshot."""
    path = Path(out_dir) / "cells" / f"{payload['cell_id']}.json"
    atomic_write_json(path, payload)
    (Path(out_dir) / PARTIAL_DIR / f"{payload['cell_id']}.pt").unlink(missing_ok=True)
    return path


def completed_cells(out_dir: Path) -> set[str]:
    """Cell ids with a readable result file (a corrupt file counts as not done)."""
    done = set()
    for p in sorted((out_dir / "cells").glob("*.json")):
        try:
            json.loads(p.read_text())
            done.add(p.stem)
        except (OSError, json.JSONDecodeError):
            continue
    return done


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
