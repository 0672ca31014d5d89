"""Time amp=off, amp=bf16 and amp=auto on the speed suite's stream (testtime.bench.speed: embedded
CIFAR-10, 3 corruptions x 200 images, batch 100), alternated in one process, one torch thread; per
setting the best wall time and the median x-inference over the repeats, and the ratios to amp=off.

    python benchmarks/precision/time_amp.py tent,eta,sar off,bf16,auto 4   # this machine's detection
    TESTTIME_BF16=slow python benchmarks/precision/time_amp.py ...          # bf16 detection forced slow
"""

import os
import statistics
import sys

import torch

torch.set_num_threads(1)
from testtime import precision  # noqa: E402
from testtime.bench import speed  # noqa: E402
from testtime.bench.experiment import ExecOptions, prepare_cell  # noqa: E402

methods = sys.argv[1].split(",")
amps = sys.argv[2].split(",") if len(sys.argv) > 2 else ["off", "bf16", "auto"]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
print(
    "TESTTIME_BF16 =",
    os.environ.get("TESTTIME_BF16"),
    "|",
    precision.bf16_support("cpu").summary(),
    flush=True,
)
opts = ExecOptions(threads=1)
res = {}
for rep in range(reps):
    for m in methods:
        for amp in amps:
            (cell,) = speed.speed_cells([m], [0], overrides={m: {"amp": amp}})
            prep = prepare_cell(cell, opts)
            if rep == 0 and m == methods[0] and amp == amps[0]:
                speed.warm_up(prep)
            p = speed.measure(cell, prep)
            c = {r["metric"]: r["value"] for r in p["rows"] if r["corruption"] == "all"}
            err = next(r["value"] for r in p["rows"] if r["corruption"] == "mean" and r["metric"] == "error")
            res.setdefault((m, amp), []).append((c["seconds"], c["x_inference"], c["bf16"], err))
            print(
                rep,
                m,
                amp,
                f"{c['seconds']:.2f}s {c['x_inference']:.2f}x bf16={c['bf16']:.0f} err={err:.2f}",
                flush=True,
            )
print("\nmethod amp best_s median_x bf16 error | best_s/best_s(off) median_x/median_x(off)")
for m in methods:
    b0 = min(s for s, *_ in res[(m, amps[0])])
    x0 = statistics.median(x for _, x, *_ in res[(m, amps[0])])
    for amp in amps:
        v = res[(m, amp)]
        b = min(s for s, *_ in v)
        x = statistics.median(x for _, x, *_ in v)
        print(
            m, amp, f"{b:.2f}", f"{x:.2f}x", v[0][2], f"{v[0][3]:.2f}", "|", f"{b / b0:.2f}", f"{x / x0:.2f}"
        )
