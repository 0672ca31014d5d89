"""`testtime serve-check`: a bounded loopback load test of `testtime serve` that proves serialisation.

The service runs in-process on 127.0.0.1 (ephemeral port); client threads send real HTTP requests
(httpx), each a random batch of corrupted CIFAR-10 test images as `.npy`. Afterwards the check
verifies that every request got exactly one response (matched by the echoed `X-Request-Id`), that
the `seq` numbers are exactly 1..requests, that the model counted `requests` batches, and that a
fresh copy of the method replaying the same batches in `seq` order ends in a bit-identical state
(every parameter, buffer and extra state) with the same predictions.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testtime.errors import ConfigError
from testtime.serve import REQUEST_ID, BackgroundServer, create_app, encode_npy, uint8_to_batch
from testtime.utils import atomic_write_json, env_info, state_digest


@dataclass
class CheckConfig:
    method: str = "tent"
    model: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    clients: int = 8
    requests: int = 400
    batch_size: int = 16
    corruption: str = "gaussian_noise"
    severity: int = 5
    seed: int = 0
    time_limit_s: float = 600.0
    out: str = "results/serve-check"

    def validate(self) -> None:
        for name in ("clients", "requests", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.time_limit_s > 0:
            raise ConfigError(f"--time-limit must be > 0 seconds, got {self.time_limit_s}")


def _client(url: str, jobs: queue.Queue, payloads: list[bytes], results: list, deadline: float) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=60.0) as http:
        while time.monotonic() < deadline:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            rid = f"req-{i:06d}"
            t0 = time.perf_counter()
            try:
                r = http.post(
                    "/predict",
                    content=payloads[i],
                    headers={"Content-Type": "application/x-npy", REQUEST_ID: rid},
                    timeout=max(1.0, min(60.0, deadline - time.monotonic())),
                )
                body = r.json()
                results.append(
                    (rid, r.status_code, r.headers.get(REQUEST_ID), body, time.perf_counter() - t0)
                )
            except Exception as e:  # a lost request is a finding, not a crash
                results.append(
                    (rid, None, None, {"error": f"{type(e).__name__}: {e}"}, time.perf_counter() - t0)
                )


def run_check(cfg: CheckConfig, log=print) -> dict[str, Any]:
    """Run the load check; returns the result dict (also written atomically to OUT/serve_check.json)."""
    import httpx

    from testtime.adapt import adapt
    from testtime.data.cifar import load_embedded_cifar10
    from testtime.data.corruptions import corrupt
    from testtime.serve import load_served_model

    cfg.validate()
    model, model_name, shape, classes = load_served_model(cfg.model)
    if shape != (3, 32, 32) or classes is None or classes[0] != "airplane":
        raise ConfigError(f"serve-check sends CIFAR-10 test images; {model_name} is not a CIFAR-10 model")
    served = adapt(model, cfg.method, **cfg.overrides)
    replay = adapt(model, cfg.method, **cfg.overrides)
    data = load_embedded_cifar10()
    log(f"corrupting {len(data)} embedded CIFAR-10 test images ({cfg.corruption}, severity {cfg.severity})")
    pool = corrupt(data.x, cfg.corruption, cfg.severity, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    picks = [rng.choice(len(pool), cfg.batch_size, replace=False) for _ in range(cfg.requests)]
    payloads = [encode_npy(pool[idx]) for idx in picks]

    app = create_app(served, model_name=model_name, input_shape=shape, class_names=classes)
    jobs: queue.Queue[int] = queue.Queue()
    for i in range(cfg.requests):
        jobs.put(i)
    results: list[tuple] = []  # list.append is atomic
    log(f"{cfg.requests} requests x {cfg.batch_size} images from {cfg.clients} clients ({cfg.method})")
    with BackgroundServer(app) as srv:
        deadline = time.monotonic() + cfg.time_limit_s
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=_client, args=(srv.url, jobs, payloads, results, deadline), daemon=True)
            for _ in range(cfg.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 65)
        wall = time.perf_counter() - t0
        metrics = httpx.get(f"{srv.url}/metrics.json", timeout=30).json()
    timed_out = time.monotonic() >= deadline or any(t.is_alive() for t in threads)

    sent = {f"req-{i:06d}": i for i in range(cfg.requests)}
    by_id: dict[str, list[tuple]] = {}
    for r in results:
        by_id.setdefault(r[0], []).append(r)
    ok = [r for r in results if r[1] == 200 and r[2] == r[0] and r[3].get("request_id") == r[0]]
    seq_of = {r[0]: r[3]["seq"] for r in ok}
    checks: dict[str, bool] = {
        "finished_within_time_limit": not timed_out,
        "one_response_per_request": set(by_id) == set(sent) and all(len(v) == 1 for v in by_id.values()),
        "all_succeeded_with_echoed_id": len(ok) == cfg.requests,
        "seq_is_1_to_requests": sorted(seq_of.values()) == list(range(1, cfg.requests + 1)),
        "server_counted_requests": metrics["requests"] == cfg.requests and metrics["errors"] == 0,
        "adapted_batches_equals_requests": served.counters()["batches"] == cfg.requests
        and metrics["adapted_batches"] == cfg.requests,
    }
    replay_ok = preds_ok = False
    if checks["seq_is_1_to_requests"] and checks["all_succeeded_with_echoed_id"]:
        log("replaying the batches in seq order on a fresh copy of the method")
        order = sorted(seq_of, key=seq_of.get)
        preds_ok = True
        answers = {r[0]: r[3] for r in ok}
        for rid in order:
            logits = replay(uint8_to_batch(pool[picks[sent[rid]]]))
            got = [p["class"] for p in answers[rid]["predictions"]]
            preds_ok &= logits.argmax(1).tolist() == got
        replay_ok = state_digest(replay) == state_digest(served)
    checks["predictions_match_replay"] = preds_ok
    checks["final_state_equals_replay"] = replay_ok

    lat = np.asarray([r[4] * 1000 for r in ok]) if ok else np.zeros(1)
    n_images = sum(r[3]["n"] for r in ok)
    result = {
        "config": asdict(cfg),
        "model": model_name,
        "wall_s": round(wall, 3),
        "requests_ok": len(ok),
        "images": n_images,
        "throughput_images_per_s": round(n_images / wall, 2),
        "throughput_requests_per_s": round(len(ok) / wall, 3),
        "client_latency_ms": {f"p{q}": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)},
        "server_latency_ms": metrics["latency_ms"],
        "model_ms": metrics["model_ms"],
        "server_metrics": metrics,
        "state_sha256": state_digest(served),
        "checks": checks,
        "passed": all(checks.values()),
        "env": env_info(),
    }
    out = Path(cfg.out) / "serve_check.json"
    atomic_write_json(out, result)
    result["path"] = str(out)
    return result
