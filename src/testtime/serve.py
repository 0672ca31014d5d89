"""HTTP inference service around an adapted model (`testtime serve`; needs `testtime[serve]`).

Every request is one batch for the adapted model. Calls into the model (predict, reset, snapshot,
load) run in a worker thread under one `threading.Lock`, so the event loop stays responsive and
batches never touch the adaptation state concurrently. Inputs are validated completely before
the lock is taken: a rejected request (HTTP 4xx, `{"error": ...}`) leaves the state unchanged.

Hostile clients: a request body must arrive within `body_timeout_s` (else 408 and the connection
is closed), at most `max_concurrent` requests are in /predict at once (more get 503 at once), a
client that disconnects mid-upload is counted in `client_disconnects` (not a server error), and
`.npy` headers are parsed by a strict parser here (not numpy's `literal_eval`). With a state file,
the service holds an exclusive lock beside it (`<state>.lock`), removes stale temporary files of
an interrupted snapshot, and refuses a file that fails its checksum or sanity checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from testtime.adapt.base import AdaptedModel
from testtime.errors import ConfigError, DataError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
    from prometheus_client.exposition import choose_encoder
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ConfigError(
        f"testtime serve needs the optional web dependencies ({e.name} is not installed); "
        "install them with: pip install 'testtime[serve]'"
    ) from None

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory file locks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("testtime.serve")
T = TypeVar("T")

NPY_TYPES = ("application/x-npy", "application/npy")
IMAGE_FORMATS = ("PNG", "JPEG")
REQUEST_ID = "X-Request-Id"


class BadInput(Exception):
    """A request the service rejects before touching the model (HTTP `status`).

    `close`: also close the connection (the client may still be sending a body we will not read).
    """

    def __init__(self, message: str, status: int = 400, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


def uint8_to_batch(x: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, C) in 0..255 -> float32 (N, C, H, W) in [0, 1] (the served conversion)."""
    return torch.from_numpy(np.array(x, dtype=np.uint8, order="C")).permute(0, 3, 1, 2).float().div(255)


def encode_npy(x: np.ndarray) -> bytes:
    """An array as `.npy` bytes (the `application/x-npy` request body)."""
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


NPY_MAGIC = b"\x93NUMPY"
NPY_MAX_HEADER = 16384  # header text bytes accepted (numpy's own reader allows 10,000 by default)
NPY_MAX_DIMS = 32
# the header is a Python dict literal of three entries; numpy reads it with ast.literal_eval, which
# raises SyntaxError/RecursionError/MemoryError/TypeError on hostile headers and is not safe to call
# from several threads at once on CPython 3.11. Parsed here with bounded regular expressions.
_NPY_VALUE = (
    r"""(?:'[^'"\\\n]{0,64}'|"[^'"\\\n]{0,64}"|True|False|\((?:\s*\d{1,20}\s*,){0,64}(?:\s*\d{1,20})?\s*\))"""
)
_NPY_FIELD = re.compile(rf"""(?:'(\w{{1,32}})'|"(\w{{1,32}})")\s*:\s*({_NPY_VALUE})\s*""")
_NPY_SPACE = re.compile(r"\s*")
_NPY_DESCR = re.compile(r"[<>|=]?[A-Za-z]\d{0,3}")


def _npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a `.npy` body; BadInput on any malformed header."""

    def bad(why: str) -> BadInput:
        return BadInput(f"body is not a valid .npy array ({why})")

    if body[:6] != NPY_MAGIC:
        raise bad("no .npy magic string at the start")
    if len(body) < 10:
        raise bad("the header is cut off")
    version = (body[6], body[7])
    if version not in ((1, 0), (2, 0)):
        raise BadInput(f".npy format version {version[0]}.{version[1]} is not supported (use 1.0 or 2.0)")
    start = 10 if version == (1, 0) else 12
    if len(body) < start:
        raise bad("the header is cut off")
    (hlen,) = struct.unpack("<H" if version == (1, 0) else "<I", body[8:start])
    if hlen > NPY_MAX_HEADER:
        raise bad(f"header of {hlen} bytes; at most {NPY_MAX_HEADER} are accepted")
    if len(body) < start + hlen:
        raise bad(f"the header declares {hlen} bytes but the body ends after {len(body) - start}")
    text = body[start : start + hlen].decode("latin1").strip()  # padded with spaces and a newline
    not_a_dict = bad("the header is not a dict of 'descr', 'fortran_order' and 'shape'")
    if not (text.startswith("{") and text.endswith("}")):
        raise not_a_dict
    fields: dict[str, str] = {}
    pos, end = 1, len(text) - 1
    while True:  # a linear scan: `key: value` entries separated by commas, a trailing comma allowed
        pos = _NPY_SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if pos == end:
            break
        m = _NPY_FIELD.match(text, pos)
        if m is None or len(fields) == 8:
            raise not_a_dict
        key = m.group(1) or m.group(2)
        if key in fields:
            raise bad(f"header key {key!r} appears twice")
        fields[key] = m.group(3)
        pos = m.end()
        if pos == end:
            break
        if text[pos] != ",":
            raise not_a_dict
        pos += 1
    if sorted(fields) != ["descr", "fortran_order", "shape"]:
        raise bad(f"header keys are {sorted(fields)}; expected 'descr', 'fortran_order', 'shape'")
    descr, fortran, shape_text = fields["descr"], fields["fortran_order"], fields["shape"]
    if descr[0] not in "'\"" or not _NPY_DESCR.fullmatch(descr[1:-1]):
        raise bad("'descr' is not a simple dtype string")
    try:
        dtype = np.dtype(descr[1:-1])
    except Exception:
        raise bad(f"'descr' {descr[1:-1]!r} is not a dtype") from None
    if fortran not in ("True", "False"):
        raise bad("'fortran_order' must be True or False")
    if not shape_text.startswith("("):
        raise bad("'shape' must be a tuple of non-negative integers")
    inner = shape_text[1:-1].strip()
    items = [t.strip() for t in inner.split(",")] if inner else []
    if items and items[-1] == "":
        items.pop()  # a trailing comma: (5,)
    elif len(items) == 1:
        raise bad("'shape' must be a tuple (write (N,) for one dimension)")
    if len(items) > NPY_MAX_DIMS or not all(t.isdigit() for t in items):
        raise bad(f"'shape' must be a tuple of at most {NPY_MAX_DIMS} non-negative integers")
    return tuple(int(t) for t in items), fortran == "True", dtype, start + hlen


def parse_npy(body: bytes, input_shape: tuple[int, int, int], max_batch: int) -> torch.Tensor:
    """Validate a `.npy` body and return the float batch; the header is checked before any allocation."""
    c, h, w = input_shape
    expect = f"uint8 (N, {h}, {w}, {c}) in 0..255 or float32 (N, {c}, {h}, {w}) in [0, 1]"
    shape, fortran, dtype, offset = _npy_header(body)
    if dtype.hasobject or not (dtype == np.uint8 or (dtype.kind == "f" and dtype.itemsize == 4)):
        raise BadInput(f".npy array has dtype {dtype}; expected {expect}")
    is_uint8 = dtype == np.uint8
    if len(shape) != 4:
        raise BadInput(f".npy array has shape {shape}; expected {expect}")
    want = (h, w, c) if is_uint8 else (c, h, w)
    if tuple(shape[1:]) != want:
        raise BadInput(f".npy {dtype} array has shape {shape}; expected {expect}")
    n = int(shape[0])
    if n == 0:
        raise BadInput(".npy array holds no images (N = 0)")
    if n > max_batch:
        raise BadInput(f"too many images in one request: {n} (limit {max_batch})")
    count = math.prod(shape)
    if len(body) - offset != count * dtype.itemsize:
        raise BadInput(
            f".npy body has {len(body) - offset} data bytes, the header {shape} {dtype} needs "
            f"{count * dtype.itemsize} (truncated or padded)"
        )
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if is_uint8:
        return uint8_to_batch(arr)
    arr = np.array(arr, dtype=np.float32, order="C")  # native byte order, C order, a writable copy
    if not np.isfinite(arr).all():
        raise BadInput(".npy float32 images contain NaN or Inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise BadInput(f".npy float32 images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return torch.from_numpy(arr)


EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK")  # Pillow converts these exactly
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNG: scaled by 1/65535


def _decode_image(im: Any, label: str, c: int) -> torch.Tensor:
    """One opened PNG/JPEG as float (C, H, W) in [0, 1]; BadInput for a mode not decoded exactly."""
    mode = im.mode
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and im.format == "PNG"):  # older Pillow: "I"
        a = np.asarray(im).astype(np.int64)
        if a.ndim != 2 or a.min(initial=0) < 0 or a.max(initial=0) > 65535:
            raise BadInput(f"{label}: 16-bit grayscale values outside 0..65535")
        x = torch.from_numpy(a).float().div(65535)[None]
        return x.expand(c, -1, -1).clone() if c == 3 else x
    if mode not in EIGHT_BIT_MODES:
        raise BadInput(
            f"{label} has image mode {mode}, which is not supported (send 8-bit or 16-bit PNG, or JPEG)"
        )
    if mode == "P":
        palette = im.getpalette() or []
        if not palette:
            raise BadInput(f"{label} is a palette image without a palette (no PLTE chunk): not a valid PNG")
        if int(np.asarray(im).max(initial=0)) >= len(palette) // 3:
            raise BadInput(f"{label} uses palette entries beyond its {len(palette) // 3}-colour palette")
    u8 = np.array(im.convert({1: "L", 3: "RGB"}[c]), dtype=np.uint8)  # alpha is dropped
    return torch.from_numpy(u8.reshape(*u8.shape[:2], c)).permute(2, 0, 1).float().div(255)


def decode_images(files: Sequence[tuple[str, bytes]], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Decode PNG/JPEG files to a float batch; each must already have the model's size (no resizing).

    8-bit modes are converted by Pillow (alpha dropped, palettes applied, 1-bit/2-bit/4-bit
    grayscale expanded); 16-bit grayscale PNGs are scaled by 1/65535 (Pillow reduces 16-bit RGB
    to 8 bits); any other mode, and a palette PNG without its palette, is refused.
    """
    from PIL import Image

    c, h, w = input_shape
    if c not in (1, 3):
        raise BadInput(f"image files cannot feed a {c}-channel model; send a .npy array instead")
    out = []
    for i, (name, data) in enumerate(files, 1):
        label = f"image {i} ({name})" if name else f"image {i}"
        if not data:
            raise BadInput(f"{label} is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in IMAGE_FORMATS:
                    raise BadInput(f"{label} is {im.format}; send PNG or JPEG")
                if im.size != (w, h):
                    raise BadInput(
                        f"{label} is {im.size[0]}x{im.size[1]}; the model expects {w}x{h} images "
                        "(resize before sending)"
                    )
                im.load()
                out.append(_decode_image(im, label, c))
        except BadInput:
            raise
        except Exception as e:  # Pillow raises many types for undecodable data
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise BadInput(f"cannot decode {label} as PNG or JPEG ({type(e).__name__}: {first})") from None
    return torch.stack(out)


DIGIT_CLASSES = tuple(str(d) for d in range(10))
INPUT_SIZE = 32  # the CIFAR and digit models take 32x32 images (ImageNet models: their own size)


def load_served_model(
    name: str | None = None, path: str | None = None, arch: str | None = None
) -> tuple[torch.nn.Module, str, tuple[int, int, int], tuple[str, ...] | None]:
    """(model, display name, input shape (C, H, W), class names or None) of a zoo model or weights file."""
    from testtime.adapt.base import first_conv_in_channels
    from testtime.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
    from testtime.models.zoo import DEFAULT_MODEL, SHIPPED, load_model, model_info

    name = name or DEFAULT_MODEL
    model = load_model(name, path, arch)
    if path is not None and (
        name in SHIPPED or arch is not None
    ):  # an architecture's weights: classes unknown
        shape = (first_conv_in_channels(model) or 3, INPUT_SIZE, INPUT_SIZE)
        return model, str(path), shape, None
    info = model_info(name)
    shape = (first_conv_in_channels(model) or 3, info.input_size, info.input_size)
    names = {
        "cifar10": CIFAR10_CLASSES,
        "cifar100": CIFAR100_CLASSES,
        "mnist": DIGIT_CLASSES,
        "usps": DIGIT_CLASSES,
    }
    classes = names.get(info.dataset)  # None for ImageNet: predictions carry the class index only
    label = name if path is None else f"{name} ({path})"
    return model, label, shape, tuple(classes) if classes is not None else None


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Prediction entropy (nats) per sample."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class StateLock:
    """An exclusive advisory lock (`fcntl.flock`) on `<state>.lock`, so two servers never share a
    state file; ConfigError naming the holder when another process has it. The lock file stays."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self.fd: int | None = None
        self.acquire()

    def acquire(self) -> None:
        if self.fd is not None or fcntl is None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {self.path} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(
                f"state file {self.path.with_suffix('')} is in use by another testtime serve{pid}, which "
                f"holds {self.path}; run one server per state file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __del__(self) -> None:
        self.release()


def remove_stale_temp_files(state_path: Path) -> list[Path]:
    """Delete `.<name>.*.tmp` files beside `state_path`: snapshots interrupted by a crash or kill -9
    (the atomic write's temporary files; call only while holding the state lock)."""
    pattern = re.compile(rf"\.{re.escape(state_path.name)}\.[A-Za-z0-9_]+\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for p in state_path.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


class Service:
    """The served model, its lock, and the request statistics behind `/metrics` and `/metrics.json`."""

    def __init__(
        self,
        adapted: AdaptedModel,
        *,
        model_name: str,
        input_shape: tuple[int, int, int],
        class_names: Sequence[str] | None,
        state_path: Path | None,
        snapshot_interval_s: float,
        snapshot_every_batches: int,
        max_batch: int,
        max_body_bytes: int,
        body_timeout_s: float,
        max_concurrent: int,
        window: int,
        entropy_window: int,
    ) -> None:
        self.adapted = adapted
        self.model_name = model_name
        self.input_shape = input_shape
        self.class_names = list(class_names) if class_names is not None else None
        self.state_path = state_path
        self.snapshot_interval_s = snapshot_interval_s
        self.snapshot_every_batches = snapshot_every_batches
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_concurrent = max_concurrent
        self.device = next((p.device for p in adapted.parameters()), torch.device("cpu"))
        self.lock = threading.Lock()
        self.requests = self.images = self.errors = self.server_errors = self.resets = 0
        self.client_disconnects = self.body_timeouts = self.rejected_busy = self.in_progress = 0
        self.snapshots = self.snapshot_errors = 0
        self.unsaved_batches = 0
        self.last_snapshot: float | None = None
        self.latencies: deque[float] = deque(maxlen=window)  # request latency (ms), queueing included
        self.model_ms: deque[float] = deque(maxlen=window)  # time inside the model call, under the lock
        self.recent_classes: deque[int] = deque(maxlen=window)
        self.entropy_trend: deque[float] = deque(maxlen=entropy_window)
        self.counters = adapted.counters()
        self.started = time.time()
        self.state_lock: StateLock | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_ServiceCollector(self))
        hist = dict(buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.request_seconds = Histogram(
            "testtime_request_duration_seconds",
            "Answered POST /predict requests: time from arrival to answer (body upload and queueing included)",
            **hist,
        )
        self.model_seconds = Histogram(
            "testtime_model_duration_seconds",
            "Time inside the model call (predict and adapt), under the lock",
            **hist,
        )
        self.snapshot_seconds = Histogram(
            "testtime_snapshot_duration_seconds", "Time to write one state snapshot", **hist
        )

    def locked(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` under the model lock (call from a worker thread), then refresh the counters."""
        with self.lock:
            try:
                return fn(*args)
            finally:
                self.counters = self.adapted.counters()

    def _adapt(self, x: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        t0 = time.perf_counter()
        logits = self.adapted(x.to(self.device)).float().cpu()
        seq, ms = int(self.adapted.counters()["batches"]), (time.perf_counter() - t0) * 1000
        self.unsaved_batches += 1
        every = self.snapshot_every_batches
        if self.state_path is not None and every and self.unsaved_batches >= every:
            try:  # before the answer: with every=1 an answered batch is on disk
                self._save()
            except Exception:
                self.snapshot_errors += 1
                log.exception("snapshot to %s after batch %d failed", self.state_path, seq)
        return logits, seq, ms

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Predict and adapt on one batch: (logits, seq = the model's batch counter, model time in ms)."""
        return self.locked(self._adapt, x)

    def _save(self) -> None:
        assert self.state_path is not None
        t0 = time.perf_counter()
        self.adapted.save_state(self.state_path)  # atomic: readers see the old or the new file
        self.snapshot_seconds.observe(time.perf_counter() - t0)
        self.snapshots += 1
        self.unsaved_batches = 0
        self.last_snapshot = time.time()

    def snapshot(self) -> None:
        """Save the whole adaptation state to `state_path` (under the lock; call from a worker thread)."""
        self.locked(self._save)

    async def snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval_s)
            try:
                await run_in_threadpool(self.snapshot)
            except Exception:
                self.snapshot_errors += 1
                log.exception("snapshot to %s failed", self.state_path)

    def name_of(self, k: int) -> str | None:
        return self.class_names[k] if self.class_names and k < len(self.class_names) else None

    def label(self, k: int) -> str:
        return self.name_of(k) or str(k)

    def class_counts(self) -> dict[str, int]:
        n_cls = len(self.class_names or []) or (max(self.recent_classes, default=-1) + 1)
        counts = np.bincount(np.asarray(self.recent_classes, dtype=np.int64), minlength=n_cls)
        return {self.label(k): int(v) for k, v in enumerate(counts)}

    def entropy_mean(self) -> float | None:
        finite = [v for v in (_num(v, 5) for v in self.entropy_trend) if v is not None]
        return _num(float(np.mean(finite)), 5) if finite else None

    def metrics(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "images": self.images,
            "adapted_batches": self.counters["batches"],
            "adapted_images": self.counters["images"],
            "restores": self.counters.get("restores", 0),
            "skipped_updates": self.counters.get("skipped_updates", 0),
            "resets": self.resets,
            "errors": self.errors,
            "server_errors": self.server_errors,
            "client_disconnects": self.client_disconnects,
            "body_timeouts": self.body_timeouts,
            "rejected_busy": self.rejected_busy,
            "in_progress": self.in_progress,
            "snapshots": self.snapshots,
            "snapshot_errors": self.snapshot_errors,
            "last_snapshot_unix": self.last_snapshot,
            "uptime_s": round(time.time() - self.started, 3),
            "entropy": {
                "recent_batch_means": [_num(v, 5) for v in self.entropy_trend],
                "mean": self.entropy_mean(),
            },
            "class_histogram": {"window": len(self.recent_classes), "counts": self.class_counts()},
            "latency_ms": _percentiles(self.latencies),
            "model_ms": _percentiles(self.model_ms),
        }


class _ServiceCollector:
    """The service's counters and gauges for Prometheus, read from the Service at scrape time."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Any]:
        s, c = self.svc, self.svc.counters
        info = InfoMetricFamily("testtime_service", "The served method and model")
        info.add_metric([], {"method": s.adapted.name, "model": s.model_name})
        yield info
        for name, doc, value in (
            ("requests", "POST /predict requests received", s.requests),
            ("images", "Images answered", s.images),
            ("client_errors", "POST /predict requests refused with 4xx (bad input, too large, body timeout)", s.errors),
            ("server_errors", "Requests that failed with 500", s.server_errors),
            ("client_disconnects", "Clients that disconnected before their request body was complete", s.client_disconnects),
            ("body_timeouts", "Request bodies not received within the body timeout (answered 408)", s.body_timeouts),
            ("rejected_busy", "POST /predict requests refused with 503: too many in progress", s.rejected_busy),
            ("resets", "POST /reset calls", s.resets),
            ("snapshots", "State snapshots written", s.snapshots),
            ("snapshot_errors", "State snapshots that failed", s.snapshot_errors),
            ("adapted_batches", "Batches the model adapted on (resumed from the state file)", c["batches"]),
            ("adapted_images", "Images the model adapted on (resumed from the state file)", c["images"]),
            ("collapse_restores", "Collapse-guard restores", c.get("restores", 0)),
            ("skipped_updates", "Updates skipped for a non-finite loss or gradient", c.get("skipped_updates", 0)),
        ):  # fmt: skip
            yield CounterMetricFamily(f"testtime_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "testtime_requests_in_progress", "POST /predict requests in progress", value=s.in_progress
        )
        yield GaugeMetricFamily(
            "testtime_start_time_seconds", "Unix time the service started", value=s.started
        )
        if s.last_snapshot is not None:
            yield GaugeMetricFamily(
                "testtime_last_snapshot_timestamp_seconds",
                "Unix time of the last state snapshot",
                value=s.last_snapshot,
            )
        mean = s.entropy_mean()
        if mean is not None:
            yield GaugeMetricFamily(
                "testtime_prediction_entropy_nats",
                f"Mean prediction entropy over the last {len(s.entropy_trend)} batches",
                value=mean,
            )
        g = GaugeMetricFamily(
            "testtime_recent_predictions",
            f"Predicted classes among the last {len(s.recent_classes)} predictions",
            labels=["class"],
        )
        for k, v in s.class_counts().items():
            g.add_metric([k], v)
        yield g


def _percentiles(values: deque[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    pct = {f"p{q}": round(float(np.percentile(a, q)), 3) if len(a) else None for q in (50, 90, 99)}
    return {"window": len(a), **pct}


def _num(v: float, digits: int = 6) -> float | None:
    """A JSON-safe rounded number (None for NaN/Inf)."""
    return round(v, digits) if math.isfinite(v) else None


def _error(status: int, message: str, request_id: str | None = None, close: bool = False) -> JSONResponse:
    headers = {REQUEST_ID: request_id} if request_id else {}
    if close:  # uvicorn closes the connection after this answer, unread body and all
        headers["Connection"] = "close"
    if status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise BadInput(
            f"request body of {declared[:40]} bytes exceeds the limit of {limit} bytes", 413, close=True
        )
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BadInput(f"request body exceeds the limit of {limit} bytes", 413, close=True)
                chunks.append(chunk)
    except TimeoutError:
        raise BadInput(
            f"request body not received within {timeout_s:g} s ({size} bytes arrived)", 408, close=True
        ) from None
    return b"".join(chunks)


async def _read_batch(svc: Service, request: Request) -> torch.Tensor:
    """The request's images as one validated float batch (N, C, H, W), or BadInput."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in (*NPY_TYPES, "multipart/form-data"):
        raise BadInput(
            f"unsupported Content-Type {ctype[:100] or '(none)'!r}: send multipart/form-data image files "
            "(PNG/JPEG) or a .npy array as application/x-npy",
            415,
            close=True,
        )
    body = await _read_body(request, svc.max_body_bytes, svc.body_timeout_s)
    if not body:
        raise BadInput("empty request body")
    if ctype != "multipart/form-data":
        return await run_in_threadpool(parse_npy, body, svc.input_shape, svc.max_batch)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=svc.max_batch, max_fields=svc.max_batch)
    except (MultiPartException, StarletteHTTPException) as e:
        msg = getattr(e, "message", None) or getattr(e, "detail", str(e))
        if "too many files" in str(msg).lower():
            raise BadInput(f"too many images in one request (limit {svc.max_batch})") from None
        raise BadInput(f"malformed multipart body ({msg})") from None
    try:
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if not isinstance(v, str)]
    finally:
        await form.close()
    if not files:
        raise BadInput("the multipart request holds no image files")
    if len(files) > svc.max_batch:
        raise BadInput(f"too many images in one request: {len(files)} (limit {svc.max_batch})")
    return await run_in_threadpool(decode_images, files, svc.input_shape)


def create_app(
    adapted: AdaptedModel,
    *,
    model_name: str = "model",
    input_shape: tuple[int, int, int] = (3, 32, 32),
    class_names: Sequence[str] | None = None,
    state_path: str | os.PathLike | None = None,
    snapshot_interval_s: float = 60.0,
    snapshot_every_batches: int = 0,
    max_batch: int = 1024,
    max_body_bytes: int = 64 << 20,
    body_timeout_s: float = 30.0,
    max_concurrent: int = 64,
    window: int = 1000,
    entropy_window: int = 50,
) -> FastAPI:
    """A FastAPI app serving `adapted` (see the module docstring and README for the endpoints).

    With `state_path`: an exclusive lock is taken on `<state_path>.lock` (ConfigError if another
    server holds it; released when the app shuts down), stale temporary files of interrupted
    snapshots are removed, an existing state file is loaded (ModelError, file untouched, if it is
    damaged or does not fit), and the state is saved there every `snapshot_interval_s` seconds
    (0: no periodic snapshots), after every `snapshot_every_batches` adapted batches (0: off;
    1: before each answer) and when the app shuts down.
    """
    if not isinstance(adapted, AdaptedModel):
        raise ConfigError(f"create_app needs an AdaptedModel, got {type(adapted).__name__}")
    if not (math.isfinite(snapshot_interval_s) and snapshot_interval_s >= 0):
        raise ConfigError(f"snapshot interval must be >= 0 seconds, got {snapshot_interval_s}")
    if not (isinstance(snapshot_every_batches, int) and snapshot_every_batches >= 0):
        raise ConfigError(f"snapshot-every-batches must be an integer >= 0, got {snapshot_every_batches}")
    if not (math.isfinite(body_timeout_s) and body_timeout_s > 0):
        raise ConfigError(f"body timeout must be > 0 seconds, got {body_timeout_s}")
    if max_batch < 1 or max_body_bytes < 1 or window < 1 or entropy_window < 1 or max_concurrent < 1:
        raise ConfigError("max_batch, max_body_bytes, max_concurrent, window and entropy_window must be >= 1")
    path = Path(state_path) if state_path is not None else None
    if path is not None and not path.exists():
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
            raise ConfigError(
                f"cannot write state snapshots to {path}: {path.parent} is not a writable directory"
            )
    svc = Service(
        adapted,
        model_name=model_name,
        input_shape=tuple(input_shape),  # type: ignore[arg-type]
        class_names=class_names,
        state_path=path,
        snapshot_interval_s=snapshot_interval_s,
        snapshot_every_batches=snapshot_every_batches,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        max_concurrent=max_concurrent,
        window=window,
        entropy_window=entropy_window,
    )
    if path is not None:
        svc.state_lock = StateLock(path)  # ConfigError: another server has this state file
        try:
            for p in remove_stale_temp_files(path):
                log.info("removed %s, left by an interrupted snapshot", p)
            if path.exists():
                # ModelError on a damaged, implausible or mismatching file, which is left as it is
                svc.locked(adapted.load_state, path)
                log.info("resumed adaptation state from %s (%d batches)", path, svc.counters["batches"])
        except BaseException:
            svc.state_lock.release()
            raise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if svc.state_lock is not None:
            svc.state_lock.acquire()  # held since create_app; again if this app is served a second time
        if path is not None and snapshot_interval_s > 0:
            task = asyncio.create_task(svc.snapshot_loop())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if path is not None:
                try:
                    await run_in_threadpool(svc.snapshot)
                    log.info("saved adaptation state to %s", path)
                except Exception:
                    svc.snapshot_errors += 1
                    log.exception("final snapshot to %s failed", path)
            if svc.state_lock is not None:
                svc.state_lock.release()

    app = FastAPI(title="testtime serve", version="1", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        svc.server_errors += 1
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "method": adapted.name,
            "model": model_name,
            "input_shape": list(svc.input_shape),
            "classes": svc.class_names,
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(svc.registry), media_type=content_type)

    @app.get("/metrics.json")
    async def metrics_json() -> dict[str, Any]:
        return svc.metrics()

    @app.post("/reset")
    async def reset(request: Request) -> JSONResponse:
        rid = request.headers.get(REQUEST_ID)
        await run_in_threadpool(svc.locked, adapted.reset)
        svc.resets += 1
        headers = {REQUEST_ID: rid} if rid else None
        return JSONResponse({"status": "reset", "resets": svc.resets}, headers=headers)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        rid = request.headers.get(REQUEST_ID)
        rid = rid[:200] if rid else None
        svc.requests += 1
        if svc.in_progress >= svc.max_concurrent:
            svc.rejected_busy += 1
            return _error(
                503, f"busy: {svc.max_concurrent} requests in progress; retry later", rid, close=True
            )
        svc.in_progress += 1
        try:
            x = await _read_batch(svc, request)
            logits, seq, model_ms = await run_in_threadpool(svc.predict, x)
        except BadInput as e:
            svc.errors += 1
            if e.status == 408:
                svc.body_timeouts += 1
            return _error(e.status, str(e), rid, close=e.close)
        except DataError as e:  # the model's own validation (e.g. the method's minimum batch size)
            svc.errors += 1
            return _error(400, str(e), rid)
        except ClientDisconnect:  # the client went away mid-upload (or uvicorn dropped a malformed body)
            svc.client_disconnects += 1
            log.info("client disconnected before its request body was complete (request id %s)", rid)
            return _error(400, "client disconnected", rid, close=True)  # nobody reads this
        except Exception as e:
            svc.server_errors += 1
            log.exception("predict failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}", rid)
        finally:
            svc.in_progress -= 1
        probs = logits.softmax(1)
        conf, cls = probs.max(1)
        classes = cls.tolist()
        svc.images += len(classes)
        svc.recent_classes.extend(classes)
        svc.entropy_trend.append(float(entropy(logits).mean()))  # NaN (a collapsed model) -> null
        ms = (time.perf_counter() - t0) * 1000
        svc.latencies.append(ms)
        svc.model_ms.append(model_ms)
        svc.request_seconds.observe(ms / 1000)
        svc.model_seconds.observe(model_ms / 1000)
        preds = [
            {"class": k, "name": svc.name_of(k), "confidence": _num(p)}
            for k, p in zip(classes, conf.tolist())
        ]
        body = {"seq": seq, "n": len(classes), "predictions": preds, "latency_ms": round(ms, 3)}
        if rid:
            body["request_id"] = rid
        return JSONResponse(body, headers={REQUEST_ID: rid} if rid else None)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: an ephemeral port); ConfigError if it cannot bind."""
    try:
        family, *_, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: FastAPI, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
    return uvicorn.Server(config)


def run_server(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` in the foreground until interrupted (Ctrl-C: graceful, final snapshot)."""
    try:
        _uvicorn_server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """`with BackgroundServer(app) as srv:` serves `app` on 127.0.0.1 (ephemeral port) in a thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = _uvicorn_server(app, log_level)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="testtime-serve", daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60) -> None:
        """Shut down gracefully (runs the lifespan shutdown, i.e. the final snapshot) and wait."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()
