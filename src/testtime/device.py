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
