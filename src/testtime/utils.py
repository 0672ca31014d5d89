"""Small shared helpers: seeding, atomic writes, environment capture."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes so that readers see either the old file or the complete new one."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def torch_load_error(e: BaseException) -> str:
    """torch.load's error in one line, without its advice to retry with weights_only=False (which
    would run arbitrary code from an untrusted file)."""
    text = str(e)
    if "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error: (.+?)(?: was not an allowed global| Please use|\n|$)", text)
        detail = m.group(1).strip() if m else "an object other than tensors and plain containers"
        return f"it holds Python objects that a weights-only load refuses ({detail})"
    first = (text.strip().splitlines() or ["empty or truncated file"])[0]
    return f"{type(e).__name__}: {first}"


def load_weights_only(path: str | Path, error: type[Exception], problem: str) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; any failure (missing, truncated,
    not a torch file, Python objects a weights-only load refuses) raises `error` with one line:
    "PATH: PROBLEM (reason)"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"{path}: {problem} ({torch_load_error(e)})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def env_info() -> dict[str, str]:
    """Versions and machine facts recorded with every result."""
    from testtime import __version__

    return {
        "testtime": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }


def _feed_digest(h: Any, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        h.update(f"{v.dtype}{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(str(k).encode())
            _feed_digest(h, v[k])
    elif isinstance(v, (list, tuple)):
        for item in v:
            _feed_digest(h, item)
    else:
        h.update(repr(v).encode())


def state_digest(module: torch.nn.Module, exclude: Collection[str] = ()) -> str:
    """sha256 over a module's whole `state_dict()` (names, dtypes, shapes, values, extra state),
    leaving out the keys in `exclude`."""
    h = hashlib.sha256()
    _feed_digest(h, {k: v for k, v in module.state_dict().items() if k not in exclude})
    return h.hexdigest()
