"""The adaptation-state file of `AdaptedModel.save_state` / `load_state`: checksummed, plain data.

A state file is a `torch.save` of the plain dict

    {"format": "testtime-adaptation-state", "version": 1, "method": <name>,
     "sha256": <hex digest of "state">, "state": <state_dict()>}

so it loads with `torch.load(..., weights_only=True)`. The digest covers every tensor's dtype,
shape and bytes and every other value of the state dict (keys sorted), so flipped bytes in the
tensor data (which `weights_only` loading does not notice: torch does not check the zip CRCs) are
caught before anything is loaded. It guards against damage (disk, copy, a partial write), not an
attacker who can rewrite the file: such a person can write a new digest too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from testtime.errors import ModelError
from testtime.utils import _feed_digest, load_weights_only

FORMAT = "testtime-adaptation-state"
VERSION = 1


def state_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over a state dict: keys, tensor dtypes/shapes/bytes and all other values."""
    h = hashlib.sha256()
    _feed_digest(h, dict(state))
    return h.hexdigest()


def pack_state(state: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The object `save_state` writes: `state` with its checksum (write it with atomic_torch_save)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "sha256": state_sha256(state),
        "state": state,
    }


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict in a file written by `save_state`, after checking its checksum.

    Raises ModelError (one line) when the file is missing, unreadable, not a testtime state file,
    or its checksum does not match the data.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"state file not found: {path}")
    obj = load_weights_only(
        path, ModelError, "cannot read the adaptation state: truncated or not a state file"
    )
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"{path}: not an adaptation state file (expected a state dict, got {type(obj).__name__})"
        )
    if obj.get("format") != FORMAT:
        if "_extra_state" in obj or any(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelError(
                f"{path}: a plain state dict without an integrity checksum (written by torch.save or an "
                "older testtime); if you trust it, load it with "
                "adapted.load_state_dict(torch.load(path, weights_only=True)), then save_state() it again"
            )
        raise ModelError(f"{path}: not an adaptation state file (expected a state dict)")
    if obj.get("version") != VERSION:
        raise ModelError(
            f"{path}: state file version {obj.get('version')!r} is not supported (expected {VERSION})"
        )
    state, digest = obj.get("state"), obj.get("sha256")
    if not isinstance(state, Mapping) or not isinstance(digest, str):
        raise ModelError(f"{path}: damaged state file (no state or no checksum)")
    if state_sha256(state) != digest:
        raise ModelError(
            f"{path}: checksum mismatch: the state file is damaged (its data changed after it was written)"
        )
    return dict(state)


def _tensors(v: Any, name: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(v, torch.Tensor):
        yield name, v
    elif isinstance(v, Mapping):
        for k, w in v.items():
            yield from _tensors(w, f"{name}.{k}")
    elif isinstance(v, (list, tuple)):
        for i, w in enumerate(v):
            yield from _tensors(w, f"{name}[{i}]")


def check_state_values(
    state: Mapping[str, Any], counters: Iterable[str], finite_prefixes: Iterable[str], path: Path
) -> None:
    """Sanity of a (checksum-verified) state before it is loaded; ModelError naming the first problem.

    Usage counters must be non-negative integer scalars; the floating tensors under
    `finite_prefixes` (weights, normalisation statistics) and the optimiser's moments must be finite.
    Other buffers may hold NaN/Inf by design (e.g. an entropy average before its first batch).
    """
    for k in counters:
        v = state.get(k)
        if v is None:
            continue  # a missing key: the strict load names it
        ok = isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype in (torch.int64, torch.int32)
        if not ok or int(v) < 0:
            what = (
                f"{v.dtype} {v.flatten()[:1].tolist()}" if isinstance(v, torch.Tensor) else type(v).__name__
            )
            raise ModelError(
                f"{path}: counter {k} is {what}; expected a non-negative integer (damaged state)"
            )
    prefixes = tuple(finite_prefixes)
    extra = state.get("_extra_state")
    optim = extra.get("optimizer") if isinstance(extra, Mapping) else None
    items = [(k, v) for k, v in state.items() if k.startswith(prefixes) and isinstance(v, torch.Tensor)]
    if isinstance(optim, Mapping):
        items += list(_tensors(optim.get("state"), "optimizer state"))
    for k, v in items:
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise ModelError(f"{path}: {k} holds NaN or Inf values (damaged or diverged state); refused")
