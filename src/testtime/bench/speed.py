"""`testtime bench --suite speed`: what every method costs, against plain inference, in one run.

Every registered method runs on the same stream of embedded CIFAR-10 test images (three
corruptions at severity 5, continual, batch 100) with the shipped ResNet-26. A plain inference
pass of the source model (`eval()`, `torch.inference_mode`) over the identical batches is timed in
the same process right before each method and again right after it; the ratio of the method's
wall time to their mean is robust to the load on the machine. Per method the suite records
images/s, forward and backward image-passes per image (measured, and the minimum the algorithm
declares in `minimal_passes()`), the number of adapted (optimised) parameters, and the memory the
method keeps as deterministic tensor byte counts (no process-RSS): its state beyond the model's
own weights (teachers, anchors, memories, statistics, counters), its optimiser state, the
collapse guard's copy of the source model, and the reset snapshot. On CUDA the peak allocated
memory of the run is recorded as well.

MEMO, which adapts on 32 augmented views of every single image, runs on a smaller slice of the
same corruptions (`SLICES`; its inference reference is timed on that slice too), so the whole
suite takes a few minutes on two CPU cores. On a machine busy with other jobs, `--threads 1` gives
steadier numbers: two OpenMP threads competing with other processes for two cores can be many
times slower than one.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from testtime.adapt.base import AdaptedModel
from testtime.bench.experiment import ExecOptions, PreparedCell, prepare_cell
from testtime.bench.report import load_rows, speed_summary, speed_table
from testtime.bench.runner import Cell, cell_payload, run_stream, write_payload
from testtime.data.streams import Stream
from testtime.device import select_device
from testtime.errors import ConfigError
from testtime.precision import AMP_CODES, effective_precision, precision_label, precision_record
from testtime.utils import atomic_write_json

CORRUPTIONS = ("gaussian_noise", "motion_blur", "jpeg_compression")  # a noise, a blur, a digital shift
PER_DOMAIN = 200  # images per corruption
BATCH_SIZE = 100
SEVERITY = 5
# (images per corruption, batch size) of methods run on a smaller slice of the same corruptions:
# MEMO adapts on 32 augmented views of every single image (33 forward + 32 backward passes each,
# about 125x inference), so 600 images would take as long as all other methods together
SLICES: dict[str, tuple[int, int]] = {"memo": (10, 10)}


def speed_cells(
    methods: list[str],
    seeds: Iterable[int],
    per_domain: int | None = None,
    batch_size: int | None = None,
    slices: dict[str, tuple[int, int]] | None = None,
    overrides: dict[str, dict[str, str]] | None = None,
) -> list[Cell]:
    """One cell per method and seed on the speed stream (or the method's smaller slice); the
    defaults are the module's PER_DOMAIN, BATCH_SIZE and SLICES."""
    per_domain, batch_size = per_domain or PER_DOMAIN, batch_size or BATCH_SIZE
    slices = SLICES if slices is None else slices
    cells = []
    for seed in seeds:
        for m in methods:
            n, bs = slices.get(m, (per_domain, batch_size))
            cells.append(
                Cell(
                    method=m,
                    scenario="continual",
                    seed=seed,
                    dataset="cifar10",
                    severity=SEVERITY,
                    batch_size=bs,
                    corruptions=CORRUPTIONS,
                    n_per_domain=n,
                    overrides=tuple(sorted((overrides or {}).get(m, {}).items())),
                    data="embedded",
                )
            )
    return cells


def stream_description() -> str:
    slices = ", ".join(f"{m} {n}/corruption (batch {bs})" for m, (n, bs) in SLICES.items())
    return (
        f"embedded CIFAR-10 test images, {', '.join(CORRUPTIONS)} at severity {SEVERITY}, continual, "
        f"{PER_DOMAIN} images per corruption, batch {BATCH_SIZE}; smaller slices: {slices}"
    )


# ----------------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_inference(model: nn.Module, stream: Stream) -> float:
    """Seconds of plain inference (`eval()`, inference mode) of `model` over the batches of `stream`,
    timed exactly as `run_stream` times a method (the model call only, synchronised)."""
    device = next(model.parameters()).device
    model.eval()
    seconds = 0.0
    with torch.inference_mode():
        for batch in stream:
            x = batch.x.to(device, non_blocking=True)
            _sync(device)
            t0 = time.perf_counter()
            model(x.contiguous(memory_format=torch.channels_last))
            _sync(device)
            seconds += time.perf_counter() - t0
    return seconds


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct tensors among `tensors` (non-tensors are ignored)."""
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _optimizer_tensors(state: dict[Any, Any] | None) -> list[Any]:
    return [v for s in (state or {}).values() for v in s.values()]


def memory_kept(adapted: AdaptedModel, source: nn.Module) -> dict[str, int]:
    """Bytes of tensors the method keeps besides the weights of the model it adapts.

    state: entries of the wrapper's state_dict that are not the wrapped model's own tensors
    (teachers, anchors, memory banks, source statistics, counters, ...); optimizer: optimiser state;
    guard: the collapse guard's frozen copy of the source model (kept outside the state_dict);
    snapshot: the reset point (a copy of the whole state_dict, model included, and optimiser state).
    """
    own = {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in source.state_dict().items()}
    state = [
        v
        for k, v in adapted.state_dict().items()
        if isinstance(v, torch.Tensor) and own.get(k) != (tuple(v.shape), v.dtype)
    ]
    reference = adapted.__dict__.get("_reference")
    snapshot = adapted.__dict__.get("_snapshot") or {}
    optim = adapted.optimizer.state if adapted.optimizer is not None else None
    return {
        "state": tensor_bytes(state),
        "optimizer": tensor_bytes(_optimizer_tensors(optim)),
        "guard": tensor_bytes(reference.state_dict().values()) if reference is not None else 0,
        "snapshot": tensor_bytes(snapshot.get("module", {}).values())
        + tensor_bytes(_optimizer_tensors((snapshot.get("optimizer") or {}).get("state"))),
    }


def adapted_params(adapted: AdaptedModel) -> int:
    """Elements of the parameters the method optimises (0 without an optimiser)."""
    if adapted.optimizer is None:
        return 0
    params = {id(p): p for g in adapted.optimizer.param_groups for p in g["params"]}
    return sum(p.numel() for p in params.values())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def measure(cell: Cell, prep: PreparedCell) -> dict[str, Any]:
    """Time plain inference, then the method, on the cell's stream; return the result payload."""
    compile_seconds = None
    if prep.adapted.config.compile != "off":
        # compiled methods: one untimed pass over the stream compiles every graph the method needs
        # (batch and subset shapes, teacher/student modes); the state is then reset and timed afresh
        t0 = time.perf_counter()
        run_stream(prep.adapted, prep.stream)
        compile_seconds = time.perf_counter() - t0
        prep.adapted.reset()
        prep.adapted.reset_counters()
    load = os.getloadavg()
    before = time_inference(prep.model, prep.stream)
    res = run_stream(prep.adapted, prep.stream)
    after = time_inference(prep.model, prep.stream)
    inference = (before + after) / 2  # bracketing the method: a drift in machine load cancels
    adapted = prep.adapted
    n = max(1, res.counters["images"])
    minimal = adapted.minimal_passes() if hasattr(adapted, "minimal_passes") else None
    mem = memory_kept(adapted, prep.model)
    device = next(prep.model.parameters()).device
    speed: dict[str, Any] = {
        "inference_seconds": inference,
        "inference_seconds_before": before,
        "inference_seconds_after": after,
        "inference_images_per_s": _ratio(n, inference),
        "x_inference": _ratio(res.cost["seconds"], inference),
        "setup_seconds": prep.setup_seconds,
        **({"compile_warmup_seconds": compile_seconds} if compile_seconds is not None else {}),
        "adapted_params": adapted_params(adapted),
        **{f"{k}_bytes": v for k, v in mem.items()},
        "loadavg_1m": load[0],
        "loadavg_5m": load[1],
        "loadavg_15m": load[2],
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        # precision: the amp setting (AMP_CODES) and whether bf16 autocast actually ran (1) or fp32 (0)
        "amp_requested": AMP_CODES[adapted.config.amp],
        "bf16": 1.0 if effective_precision(adapted.config.amp, device) == "bf16" else 0.0,
    }
    if minimal is not None:
        speed.update(
            min_forward_per_image=float(minimal.forward),
            min_backward_per_image=float(minimal.backward),
            forward_vs_min=_ratio(res.cost["forward_per_image"], minimal.forward),
            backward_vs_min=_ratio(res.cost["backward_per_image"], minimal.backward),
            passes_why=minimal.why,
        )
    res.extra.update(speed)
    res.extra["data"] = prep.stream.data.describe()
    res.extra["precision"] = effective_precision(adapted.config.amp, device)
    return cell_payload(cell, res, adapted.describe())


def warm_up(prep: PreparedCell) -> None:
    """One untimed inference and one Tent-like update on the first batch (kernel selection, caches)."""
    from testtime.adapt.registry import adapt

    x = next(iter(prep.stream)).x.to(next(prep.model.parameters()).device)
    with torch.inference_mode():
        prep.model.eval()(x)
    adapt(prep.model, "tent", guard=False)(x)


# ----------------------------------------------------------------------------- the suite
def run_speed(cells: list[Cell], opts: ExecOptions, out_dir: Path, console: Console) -> dict[str, Any]:
    """Measure every cell in this process, one after another; write cells/, speed.json; print the table.

    Results of an earlier speed run in `out_dir` are replaced (the table is one run, one machine state).
    """
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    old = sorted((out_dir / "cells").glob("*.json"))
    for p in old:
        p.unlink()
    if old:
        console.log(f"speed: replaced {len(old)} result file(s) of an earlier run")
    skipped: dict[str, str] = {}
    warmed = False
    for i, cell in enumerate(cells, 1):
        try:
            prep = prepare_cell(cell, opts, console.log)
        except ConfigError as e:  # e.g. a method that needs source images that are not available
            skipped[cell.method] = str(e)
            console.log(f"[{i}/{len(cells)}] {cell.method}: skipped ({e})")
            continue
        if not warmed:
            warm_up(prep)
            warmed = True
        payload = measure(cell, prep)
        write_payload(out_dir, payload)
        c = {r["metric"]: r["value"] for r in payload["rows"] if r["corruption"] == "all"}
        console.log(
            f"[{i}/{len(cells)}] {cell.method}: {c['images_per_s']:.0f} img/s, {c['x_inference']:.2f}x inference, "
            f"fwd {c['forward_per_image']:.2f}/{c.get('min_forward_per_image', float('nan')):.2f}, "
            f"bwd {c['backward_per_image']:.2f}/{c.get('min_backward_per_image', float('nan')):.2f} per image, "
            f"{precision_label(c.get('bf16'), c.get('amp_requested'))}"
        )
        del prep, payload
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t_start
    if not (out_dir / "cells").is_dir():
        raise ConfigError(f"no method could be measured: {'; '.join(skipped.values())}")
    rows = load_rows(out_dir)
    device = select_device(opts.device)
    precision = precision_record(device)
    table = speed_table(rows, precision)
    summary = {
        "stream": stream_description(),
        "precision": precision,  # is bf16 fast here, how that was decided, the measured factor
        "slices": {m: {"per_corruption": n, "batch_size": bs} for m, (n, bs) in SLICES.items()},
        "wall_seconds": wall,
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "skipped": skipped,
        "memory_note": (
            "tensor bytes of the state each method keeps (deterministic); peak memory only on CUDA "
            "(max_memory_allocated); no process-RSS figures"
        ),
        "methods": speed_summary(rows),
        "table": table,
    }
    atomic_write_json(out_dir / "speed.json", summary)
    console.print("\n".join(table), markup=False, highlight=False, soft_wrap=True)
    console.log(
        f"speed: {len(cells) - len(skipped)} method run(s) in {wall:.0f} s; load average "
        f"{load_start[0]:.2f} at the start, {summary['loadavg_end'][0]:.2f} at the end; "
        f"{summary['torch_threads']} torch thread(s); {stream_description()}"
    )
    console.log(f"speed: precision: {precision['summary']}")
    return summary
