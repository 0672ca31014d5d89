"""Choosing the torch device: `auto` (CUDA, then Apple MPS, then CPU) or an explicit name."""

from __future__ import annotations

import torch

from testtime.errors import ConfigError

AUTO = "auto"


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(name: str | torch.device | None = AUTO) -> torch.device:
    """The device for `name`: `auto`/None picks cuda, then mps, then cpu; otherwise `name` is
    checked (an unavailable cuda/mps device or a cuda index beyond the visible GPUs is a ConfigError).

    Every command that takes `--device` (run, bench, serve) resolves it here.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name.strip().lower() == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name.strip())
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"unknown device {name!r}: {e} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type == "mps" and not mps_available():
        raise ConfigError(f"device {name} requested but Apple MPS is not available")
    return dev


def describe_device(device: torch.device) -> str:
    """A short label for results files: `cpu (N threads)`, `cuda:0 (NVIDIA H100 ...)`, `mps`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def auto_threads() -> int:
    """Torch CPU threads for `--threads 0` (auto): half of torch's default (one per physical core),
    at least 1; with $OMP_NUM_THREADS set, that.

    The choice depends on the machine only, never on its momentary load, so the same command on
    the same machine runs with the same threads (error values can differ slightly between thread
    counts). Half the cores leaves room for the data pipeline and other processes: on this
    project's 2-core machine one thread was faster than two even when it was nearly idle (a
    15-batch `testtime run` 14.5 s vs 39.7 s), and on a busy one two threads made `testtime run`
    25x and `testtime scale solve` 8x slower (README, "Threads").
    """
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() // 2)
