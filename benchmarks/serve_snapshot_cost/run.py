"""Cost of per-batch state snapshots in `testtime serve` (`--snapshot-every-batches N`).

Serves the shipped CIFAR-10 ResNet-26 with Tent in-process on 127.0.0.1 and sends ROUNDS x
REQUESTS sequential POST /predict requests (one client, BATCH corrupted CIFAR-10 test images each,
as .npy) for each configuration, interleaving the configurations round by round so that machine
load drifts affect them alike:

  no_state      no --state
  interval_60s  --state, --snapshot-interval 60 (the default; no snapshot falls in a short round)
  every_10      --state, --snapshot-every-batches 10
  every_1       --state, --snapshot-every-batches 1 (every answered batch is on disk)

Writes results.json beside this script. Usage:
  python benchmarks/serve_snapshot_cost/run.py [--rounds 3] [--requests 40] [--batch 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from testtime.adapt import adapt
from testtime.data.cifar import load_embedded_cifar10
from testtime.data.corruptions import corrupt
from testtime.serve import BackgroundServer, create_app, encode_npy, load_served_model
from testtime.utils import env_info

CONFIGS = {
    "no_state": {},
    "interval_60s": {"snapshot_interval_s": 60.0},
    "every_10": {"snapshot_interval_s": 60.0, "snapshot_every_batches": 10},
    "every_1": {"snapshot_interval_s": 60.0, "snapshot_every_batches": 1},
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, name, shape, classes = load_served_model()
    data = load_embedded_cifar10()
    pool = corrupt(data.x[:1000], "gaussian_noise", 5, seed=0)
    rng = np.random.default_rng(0)
    payloads = [
        encode_npy(pool[rng.choice(len(pool), args.batch, replace=False)]) for _ in range(args.requests)
    ]
    runs: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for cfg_name, kw in CONFIGS.items():
                state = Path(tmp) / f"{cfg_name}-{r}.pt" if kw else None
                app = create_app(
                    adapt(model, "tent"),
                    model_name=name,
                    input_shape=shape,
                    class_names=classes,
                    state_path=state,
                    **kw,
                )
                svc = app.state.service
                with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
                    c.post(
                        "/predict", content=payloads[0], headers={"Content-Type": "application/x-npy"}
                    )  # warm-up
                    lat = []
                    t0 = time.perf_counter()
                    for p in payloads:
                        t1 = time.perf_counter()
                        c.post(
                            "/predict", content=p, headers={"Content-Type": "application/x-npy"}
                        ).raise_for_status()
                        lat.append(time.perf_counter() - t1)
                    wall = time.perf_counter() - t0
                    snaps = svc.snapshots
                    snap_s = svc.snapshot_seconds.collect()[0].samples
                runs[cfg_name].append(
                    {
                        "requests_per_s": args.requests / wall,
                        "latency_ms_p50": 1000 * float(np.percentile(lat, 50)),
                        "snapshots": snaps,
                        "snapshot_ms_mean": 1000
                        * next((s.value for s in snap_s if s.name.endswith("_sum")), 0.0)
                        / max(1, snaps),
                        "state_file_bytes": state.stat().st_size
                        if state is not None and state.exists()
                        else None,
                    }
                )
                print(cfg_name, r, json.dumps(runs[cfg_name][-1]), flush=True)
    summary = {
        k: {
            "requests_per_s_median": round(statistics.median(x["requests_per_s"] for x in v), 2),
            "images_per_s_median": round(args.batch * statistics.median(x["requests_per_s"] for x in v), 1),
            "latency_ms_p50_median": round(statistics.median(x["latency_ms_p50"] for x in v), 1),
            "snapshot_ms_mean": round(statistics.mean(x["snapshot_ms_mean"] for x in v), 1)
            if v[0]["snapshots"]
            else None,
            "state_file_bytes": v[-1]["state_file_bytes"],
        }
        for k, v in runs.items()
    }
    base = summary["interval_60s"]["requests_per_s_median"]
    for k in summary:
        summary[k]["throughput_vs_interval_60s"] = round(summary[k]["requests_per_s_median"] / base, 3)
    out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "args": vars(args), "summary": summary,
           "runs": runs, "model": name, "method": "tent", "env": env_info()}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
