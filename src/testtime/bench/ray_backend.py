"""Suite cells on a Ray cluster (`testtime bench --backend ray`; needs `pip install 'testtime[ray]'`).

Each cell is one Ray task (1 CPU); the driver writes each finished cell with `write_payload`, exactly
as the local process pool does, so results merge into the same tidy CSV without loss or duplicates
and an interrupted sweep resumes. Workers import `testtime`: on a local instance the installed
package is used; on a remote cluster every node needs it installed (or pass a Ray `runtime_env`,
e.g. `{"pip": ["testtime[ray]"]}` or `{"working_dir": ...}`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from testtime.bench.experiment import ExecOptions, execute_cell
from testtime.bench.report import render
from testtime.bench.runner import Cell, write_payload
from testtime.errors import ConfigError, TestTimeError

INSTALL_HINT = "pip install 'testtime[ray]'"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray


def _execute_on_ray(cell: Cell, opts: ExecOptions) -> dict[str, Any]:
    return execute_cell(cell, opts)  # prepare_cell sets the torch threads from opts.threads


def run_cells_ray(
    cells: list[Cell],
    opts: ExecOptions,
    out_dir: Path,
    jobs: int,
    console: Console,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> None:
    """Run cells as Ray tasks; the driver writes each finished cell (no loss, no duplicates).

    `address` (or $RAY_ADDRESS) connects to a running cluster; otherwise a local instance with
    `jobs` CPUs is started and shut down at the end. A Ray session already open in this process is
    reused. A failed cell does not stop the others: every cell that finishes is written, then the
    first failure is raised (rerunning resumes with the missing cells).
    """
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if ray.is_initialized():
        console.log("ray: using the Ray session already open in this process")
    elif address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        started = True
    else:
        ray.init(
            num_cpus=jobs if jobs > 0 else os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )
        started = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        local = not address
        # a local instance shares this machine's cores among `jobs` tasks, as the process pool does
        threads = opts.threads or (max(1, (os.cpu_count() or 1) // max(1, jobs)) if local else 1)
        wopts = dataclasses.replace(opts, threads=threads)
        if local and wopts.cache_dir:  # workers share the driver's machine: same cache, absolute path
            wopts = dataclasses.replace(wopts, cache_dir=str(Path(wopts.cache_dir).resolve()))
        console.log(
            f"ray: {len(cells)} cells as tasks on {'a local instance' if local else address} "
            f"({cpus} CPUs, {threads} torch threads per task)"
        )
        task = ray.remote(num_cpus=1, max_retries=0)(_execute_on_ray)
        pending = {task.remote(c, wopts): c for c in cells}
        failures: list[tuple[Cell, BaseException]] = []
        done_n = 0
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                payload = ray.get(ref)
            except Exception as e:  # the task raised (a RayTaskError) or its worker died
                failures.append((cell, e))
                console.log(f"[red]cell {cell.cell_id} failed:[/] {_cause(e)}")
                continue
            write_payload(out_dir, payload)
            done_n += 1
            console.log(f"[{done_n}/{len(cells)}] {cell.cell_id}")
            render(out_dir, plots=False)
        if failures:
            cell, err = failures[0]
            cause = _cause(err)
            msg = (
                f"{len(failures)} of {len(cells)} cells failed on Ray, first {cell.cell_id}: "
                f"{type(cause).__name__}: {cause}; the {done_n} finished cells are written "
                "(rerun to resume)"
            )
            if isinstance(cause, TestTimeError):
                raise type(cause)(msg) from err
            raise RuntimeError(msg) from err
    finally:
        if started:
            ray.shutdown()


def _cause(err: BaseException) -> BaseException:
    """The exception raised inside the task (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
