"""HTTP inference service around an adapted model (`testtime serve`; needs `testtime[serve]`).

Every request is one batch for the adapted model. Calls into the model (predict, reset, snapshot,
load) run in a worker thread under one `threading.Lock`, so the event loop stays responsive and
batches never touch the adaptation state concurrently. Inputs are validated completely before
the lock is taken: a rejected request (HTTP 4xx, `{"error": ...}`) leaves the state unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from testtime.adapt.base import AdaptedModel
from testtime.errors import ConfigError, DataError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ConfigError(
        f"testtime serve needs the optional web dependencies ({e.name} is not installed); "
        "install them with: pip install 'testtime[serve]'"
    ) from None

log = logging.getLogger("testtime.serve")
T = TypeVar("T")

NPY_TYPES = ("application/x-npy", "application/npy")
IMAGE_FORMATS = ("PNG", "JPEG")
REQUEST_ID = "X-Request-Id"


class BadInput(Exception):
    """A request the service rejects before touching the model (HTTP `status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def uint8_to_batch(x: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, C) in 0..255 -> float32 (N, C, H, W) in [0, 1] (the served conversion)."""
    return torch.from_numpy(np.array(x, dtype=np.uint8, order="C")).permute(0, 3, 1, 2).float().div(255)


def encode_npy(x: np.ndarray) -> bytes:
    """An array as `.npy` bytes (the `application/x-npy` request body)."""
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


# numpy parses .npy headers with ast.literal_eval; CPython 3.11's parser is not safe to run from
# several threads at once (seen here as "SystemError: AST constructor recursion depth mismatch"
# under concurrent requests), so header parsing is serialised (it is microseconds of work).
_NPY_HEADER_LOCK = threading.Lock()


def parse_npy(body: bytes, input_shape: tuple[int, int, int], max_batch: int) -> torch.Tensor:
    """Validate a `.npy` body and return the float batch; the header is checked before any allocation."""
    c, h, w = input_shape
    expect = f"uint8 (N, {h}, {w}, {c}) in 0..255 or float32 (N, {c}, {h}, {w}) in [0, 1]"
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise BadInput(f".npy format version {version} is not supported (use 1.0 or 2.0)")
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        with _NPY_HEADER_LOCK:
            shape, fortran, dtype = read_header(f)
    except (ValueError, EOFError) as e:
        raise BadInput(f"body is not a valid .npy array ({e})") from None
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
    if len(body) - f.tell() != count * dtype.itemsize:
        raise BadInput(
            f".npy body has {len(body) - f.tell()} data bytes, the header {shape} {dtype} needs "
            f"{count * dtype.itemsize} (truncated or padded)"
        )
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=f.tell())
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


def decode_images(files: Sequence[tuple[str, bytes]], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Decode PNG/JPEG files to a float batch; each must already have the model's size (no resizing)."""
    from PIL import Image

    c, h, w = input_shape
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
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
                out.append(np.asarray(im.convert(mode), dtype=np.uint8).reshape(h, w, c))
        except BadInput:
            raise
        except Exception as e:  # Pillow raises many types for undecodable data
            raise BadInput(f"cannot decode {label} as PNG or JPEG ({type(e).__name__}: {e})") from None
    return uint8_to_batch(np.stack(out))


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


class Service:
    """The served model, its lock, and the request statistics behind `/metrics`."""

    def __init__(
        self,
        adapted: AdaptedModel,
        *,
        model_name: str,
        input_shape: tuple[int, int, int],
        class_names: Sequence[str] | None,
        state_path: Path | None,
        snapshot_interval_s: float,
        max_batch: int,
        max_body_bytes: int,
        window: int,
        entropy_window: int,
    ) -> None:
        self.adapted = adapted
        self.model_name = model_name
        self.input_shape = input_shape
        self.class_names = list(class_names) if class_names is not None else None
        self.state_path = state_path
        self.snapshot_interval_s = snapshot_interval_s
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.device = next((p.device for p in adapted.parameters()), torch.device("cpu"))
        self.lock = threading.Lock()
        self.requests = self.images = self.errors = self.server_errors = self.resets = 0
        self.snapshots = self.snapshot_errors = 0
        self.last_snapshot: float | None = None
        self.latencies: deque[float] = deque(maxlen=window)  # request latency (ms), queueing included
        self.model_ms: deque[float] = deque(maxlen=window)  # time inside the model call, under the lock
        self.recent_classes: deque[int] = deque(maxlen=window)
        self.entropy_trend: deque[float] = deque(maxlen=entropy_window)
        self.counters = adapted.counters()
        self.started = time.time()

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
        return logits, int(self.adapted.counters()["batches"]), (time.perf_counter() - t0) * 1000

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Predict and adapt on one batch: (logits, seq = the model's batch counter, model time in ms)."""
        return self.locked(self._adapt, x)

    def _save(self) -> None:
        assert self.state_path is not None
        self.adapted.save_state(self.state_path)  # atomic: readers see the old or the new file
        self.snapshots += 1
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

    def metrics(self) -> dict[str, Any]:
        n_cls = len(self.class_names or []) or (max(self.recent_classes, default=-1) + 1)
        counts = np.bincount(np.asarray(self.recent_classes, dtype=np.int64), minlength=n_cls)
        trend = [_num(v, 5) for v in self.entropy_trend]
        finite = [v for v in trend if v is not None]
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
            "snapshots": self.snapshots,
            "snapshot_errors": self.snapshot_errors,
            "last_snapshot_unix": self.last_snapshot,
            "uptime_s": round(time.time() - self.started, 3),
            "entropy": {
                "recent_batch_means": trend,
                "mean": _num(float(np.mean(finite)), 5) if finite else None,
            },
            "class_histogram": {
                "window": len(self.recent_classes),
                "counts": {self.label(k): int(v) for k, v in enumerate(counts)},
            },
            "latency_ms": _percentiles(self.latencies),
            "model_ms": _percentiles(self.model_ms),
        }


def _percentiles(values: deque[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    pct = {f"p{q}": round(float(np.percentile(a, q)), 3) if len(a) else None for q in (50, 90, 99)}
    return {"window": len(a), **pct}


def _num(v: float, digits: int = 6) -> float | None:
    """A JSON-safe rounded number (None for NaN/Inf)."""
    return round(v, digits) if math.isfinite(v) else None


def _error(status: int, message: str, request_id: str | None = None) -> JSONResponse:
    headers = {REQUEST_ID: request_id} if request_id else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_batch(svc: Service, request: Request) -> torch.Tensor:
    """The request's images as one validated float batch (N, C, H, W), or BadInput."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in (*NPY_TYPES, "multipart/form-data"):
        raise BadInput(
            f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data image files "
            "(PNG/JPEG) or a .npy array as application/x-npy",
            415,
        )
    body = await _read_body(request, svc.max_body_bytes)
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
    max_batch: int = 1024,
    max_body_bytes: int = 64 << 20,
    window: int = 1000,
    entropy_window: int = 50,
) -> FastAPI:
    """A FastAPI app serving `adapted` (see the module docstring and README for the endpoints).

    With `state_path`, an existing state file is loaded now (ModelError, file untouched, if it does
    not fit), and the state is saved there every `snapshot_interval_s` seconds (0: only at
    shutdown) and when the app shuts down.
    """
    if not isinstance(adapted, AdaptedModel):
        raise ConfigError(f"create_app needs an AdaptedModel, got {type(adapted).__name__}")
    if not (math.isfinite(snapshot_interval_s) and snapshot_interval_s >= 0):
        raise ConfigError(f"snapshot interval must be >= 0 seconds, got {snapshot_interval_s}")
    if max_batch < 1 or max_body_bytes < 1 or window < 1 or entropy_window < 1:
        raise ConfigError("max_batch, max_body_bytes, window and entropy_window must be >= 1")
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
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        window=window,
        entropy_window=entropy_window,
    )
    if path is not None and path.exists():
        svc.locked(adapted.load_state, path)  # ModelError on a corrupt or mismatching file, left as is
        log.info("resumed adaptation state from %s (%d batches)", path, svc.counters["batches"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
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
    async def metrics() -> dict[str, Any]:
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
        try:
            x = await _read_batch(svc, request)
            logits, seq, model_ms = await run_in_threadpool(svc.predict, x)
        except BadInput as e:
            svc.errors += 1
            return _error(e.status, str(e), rid)
        except DataError as e:  # the model's own validation (e.g. the method's minimum batch size)
            svc.errors += 1
            return _error(400, str(e), rid)
        except Exception as e:
            svc.server_errors += 1
            log.exception("predict failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}", rid)
        probs = logits.softmax(1)
        conf, cls = probs.max(1)
        classes = cls.tolist()
        svc.images += len(classes)
        svc.recent_classes.extend(classes)
        svc.entropy_trend.append(float(entropy(logits).mean()))  # NaN (a collapsed model) -> null
        ms = (time.perf_counter() - t0) * 1000
        svc.latencies.append(ms)
        svc.model_ms.append(model_ms)
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
