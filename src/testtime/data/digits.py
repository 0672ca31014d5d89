"""Digit datasets (MNIST, USPS) as 32x32 RGB, for the MNIST<->USPS shift and open-set unknowns."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from testtime.data.cifar import ImageSet, shared_data_dirs
from testtime.errors import DataError

DIGIT_FILES = {"mnist": "mnist.npz", "usps": "usps.npz"}


def find_digits(name: str, path: str | os.PathLike | None = None) -> Path:
    """Locate `mnist.npz` / `usps.npz` (explicit path, $TESTTIME_DATA, ../shared/data, cache)."""
    if name not in DIGIT_FILES:
        raise DataError(f"unknown digit dataset {name!r}; known: {', '.join(DIGIT_FILES)}")
    if path is not None:
        p = Path(path).expanduser()
        p = p / DIGIT_FILES[name] if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"{name} data not found at {p}")
        return p
    for d in shared_data_dirs():
        if (d / DIGIT_FILES[name]).is_file():
            return d / DIGIT_FILES[name]
    raise DataError(f"{DIGIT_FILES[name]} not found; pass a path or set $TESTTIME_DATA")


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) greyscale -> uint8 (N, 32, 32, 3) by bilinear (antialiased) resizing."""
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"expected uint8 (N, H, W) greyscale digits, got {x.dtype} {x.shape}")
    out = []
    for i in range(0, len(x), 4096):
        t = torch.from_numpy(x[i : i + 4096]).float().unsqueeze(1)
        t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        out.append(t.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy())
    g = np.concatenate(out)
    return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=-1))


def load_digits(name: str, split: str = "test", path: str | os.PathLike | None = None) -> ImageSet:
    """MNIST or USPS `train`/`test`/`all` split as 32x32 RGB uint8."""
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r}; use train, test or all")
    p = find_digits(name, path)
    try:
        with np.load(p, allow_pickle=False) as z:
            parts = ["train", "test"] if split == "all" else [split]
            x = np.concatenate([z[f"x_{s}"] for s in parts])
            y = np.concatenate([z[f"y_{s}"] for s in parts]).astype(np.int64)
    except KeyError as e:
        raise DataError(f"{p}: malformed {name} npz (missing {e})") from e
    except Exception as e:
        raise DataError(f"{p}: cannot read as npz ({type(e).__name__}: {e})") from e
    return ImageSet(to_rgb32(x), y, f"{p}[{split}]")
