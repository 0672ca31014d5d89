"""Is bfloat16 fast on this device? Detection, a cached micro-benchmark, and `amp` resolution.

bfloat16 autocast roughly halves the cost of a convolutional network's passes on a CPU with
native bf16 instructions (AVX512-BF16, AMX) or a GPU with bf16 tensor cores, and makes them many
times slower where bf16 is emulated (an AVX2-only CPU: Tent 10x slower than float32). So `amp`
(every method's option, see `MethodConfig.amp`) is resolved here against what the device does:

- `off`: float32.
- `bf16`: bfloat16 where it is fast; where it is slow, warn once (with the measured factor) and
  run float32.
- `bf16!`: bfloat16 regardless (forced: to measure, or to test the bf16 path on any machine).
- `auto`: bfloat16 where it is fast, float32 elsewhere, silently.

"Fast" on a CPU needs both the instructions (the `avx512_bf16` or `amx_bf16` CPU flag, `bf16` on
ARM) and a micro-benchmark agreeing: forward and backward of a small conv+BN network (the work
of Tent-like methods) in float32 and under bf16 autocast, alternated, best of four, measured once
per machine in one thread (about half a second on an AVX512-BF16 CPU; on an AVX2 CPU it stops
after one round, bf16 being clearly slower) and cached in `$TESTTIME_CACHE/precision.json` (else
`~/.cache/testtime/precision.json`), keyed by CPU model, CPU flags, torch's CPU capability and
torch version. bf16 counts as fast when it takes at most `FAST_FACTOR` of the float32 time. On
CUDA, fast means `torch.cuda.is_bf16_supported(including_emulation=False)`; other devices (MPS)
count as not fast. `TESTTIME_BF16=fast|slow` overrides the detection (tests, or a machine the
benchmark misjudges).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from testtime.errors import ConfigError

log = logging.getLogger("testtime")

AMP_VALUES = ("off", "bf16", "bf16!", "auto")
AMP_CODES = {"off": 0, "bf16": 1, "bf16!": 2, "auto": 3}  # the setting as a number in tidy results rows
ENV = "TESTTIME_BF16"  # fast | slow: override the detection
FAST_FACTOR = 0.9  # bf16 counts as fast when it takes at most this fraction of the float32 time
CACHE_FILE = "precision.json"
BENCH_VERSION = 1  # bump when the micro-benchmark changes (invalidates cached measurements)


@dataclass(frozen=True)
class Bf16Support:
    """What this process knows about bfloat16 speed on one device type."""

    device: str  # cpu | cuda | mps
    fast: bool
    how: str  # how it was decided (environment override, instructions + benchmark, CUDA query)
    factor: float | None = None  # bf16 time / float32 time of the micro-benchmark (< 1: bf16 faster)
    cpu_capability: str = ""  # torch.backends.cpu.get_cpu_capability()
    cpu_bf16_instructions: bool = False  # avx512_bf16 / amx_bf16 (x86) or bf16 (ARM) CPU flag
    cpu_model: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and tables."""
        speed = "fast" if self.fast else "not fast"
        factor = f", bf16 takes {self.factor:.2f}x the float32 time" if self.factor is not None else ""
        where = f"cpu {self.cpu_model or '?'} (torch capability {self.cpu_capability})"
        if self.device != "cpu":
            where = self.device
        return f"bf16 {speed} on {where}{factor}; decided by {self.how}"


# ----------------------------------------------------------------------------- CPU facts
def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | ARM
            return set(value.split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_bf16_instructions(flags: set[str] | None = None) -> bool:
    """Native bf16 arithmetic: AVX512-BF16 or AMX-BF16 (x86), BF16 (ARMv8.6)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# ----------------------------------------------------------------------------- micro-benchmark
def _bench_net() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).to(memory_format=torch.channels_last)  # fmt: skip


def measure_cpu_factor(rounds: int = 4, iters: int = 1) -> dict[str, float]:
    """Seconds of `iters` Tent-like steps (forward in train mode, entropy, backward) of a small
    conv+BN network on a 16-image CIFAR-sized batch, float32 vs bf16 autocast, alternated `rounds`
    times after a warm-up, in one thread; the best time of each (rounds stop early once bf16 is
    clearly slower: that is all the answer needs). The global RNG is left untouched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = _bench_net().train()
            x = torch.rand(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)

        def steps(bf16: bool) -> float:
            t0 = time.perf_counter()
            for _ in range(iters):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = net(x)
                p = logits.float().softmax(1)
                loss = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
                net.zero_grad(set_to_none=True)
                loss.backward()
            return time.perf_counter() - t0

        steps(False), steps(True)  # warm-up: kernel selection, allocator
        best = {"fp32": float("inf"), "bf16": float("inf")}
        for _ in range(rounds):
            best["fp32"] = min(best["fp32"], steps(False))
            best["bf16"] = min(best["bf16"], steps(True))
            if best["bf16"] > 2 * best["fp32"]:
                break
    finally:
        torch.set_num_threads(threads)
    return {"fp32_seconds": best["fp32"], "bf16_seconds": best["bf16"], "factor": best["bf16"] / best["fp32"]}


def cache_path() -> Path:
    """`$TESTTIME_CACHE/precision.json`, else `~/.cache/testtime/precision.json`."""
    root = os.environ.get("TESTTIME_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "testtime") / CACHE_FILE


def machine_key() -> str:
    flags = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile", "bf16", "avx512f", "avx2"})
    return f"v{BENCH_VERSION}|{cpu_model()}|{','.join(flags)}|{cpu_capability()}|torch {torch.__version__}"


def cached_cpu_factor() -> tuple[dict[str, float], bool]:
    """The micro-benchmark's result for this machine, from the cache or measured now (then cached);
    and whether it came from the cache. An unreadable or unwritable cache only costs a re-measurement."""
    path, key = cache_path(), machine_key()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("factor"), (int, float)) and hit["factor"] > 0:
        return hit, True
    result = {**measure_cpu_factor(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        from testtime.utils import atomic_write_json

        atomic_write_json(path, {**cache, key: result})
    except OSError as e:
        log.debug("could not cache the bf16 benchmark in %s: %s", path, e)
    return result, False


# ----------------------------------------------------------------------------- detection
_DETECTED: dict[str, Bf16Support] = {}
_WARNED: set[str] = set()


def clear_cache() -> None:
    """Forget this process's detections and warnings (the file cache stays)."""
    _DETECTED.clear()
    _WARNED.clear()


def _override() -> str | None:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "detect", "auto"):
        return None
    if value not in ("fast", "slow"):
        raise ConfigError(f"${ENV}={os.environ[ENV]!r}: must be fast, slow or unset (detect)")
    return value


def bf16_support(device: torch.device | str = "cpu") -> Bf16Support:
    """Whether bf16 autocast is fast on `device`'s type (detected once per process and type)."""
    kind = torch.device(device).type
    override = _override()
    memo = f"{kind}|{override}"
    if memo not in _DETECTED:
        _DETECTED[memo] = _detect(kind, override)
    return _DETECTED[memo]


def _detect(kind: str, override: str | None) -> Bf16Support:
    if kind != "cpu":
        if override is not None:
            return Bf16Support(kind, override == "fast", f"${ENV}={override}")
        if kind == "cuda" and torch.cuda.is_available():
            try:
                fast = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # older torch: no emulation argument
                fast = bool(torch.cuda.is_bf16_supported())
            return Bf16Support(kind, fast, "torch.cuda.is_bf16_supported(including_emulation=False)")
        return Bf16Support(kind, False, f"no bf16 detection for {kind}: treated as not fast")
    facts = {"cpu_capability": cpu_capability(), "cpu_model": cpu_model()}
    instructions = cpu_bf16_instructions()
    if override is not None:
        return Bf16Support(
            "cpu", override == "fast", f"${ENV}={override}", cpu_bf16_instructions=instructions, **facts
        )
    bench, cached = cached_cpu_factor()
    factor = float(bench["factor"])
    source = f"micro-benchmark ({'cached' if cached else 'measured now'})"
    if not instructions:
        how = f"no AVX512-BF16/AMX/BF16 instructions in the CPU flags; {source}"
        return Bf16Support("cpu", False, how, factor, cpu_bf16_instructions=False, **facts)
    fast = factor <= FAST_FACTOR
    how = f"bf16 instructions present; {source} {'agrees' if fast else 'disagrees'} (fast: <= {FAST_FACTOR}x)"
    return Bf16Support("cpu", fast, how, factor, cpu_bf16_instructions=True, **facts)


def check_amp(value: str) -> bool:
    return value in AMP_VALUES


def resolve_amp(amp: str, device: torch.device | str = "cpu", who: str = "amp") -> bool:
    """Whether to run bf16 autocast for the setting `amp` on `device`; warns once per process
    (and device type) when `amp=bf16` is asked where bf16 is slow, then answers float32."""
    if amp == "off":
        return False
    if amp == "bf16!":
        return True
    if amp not in AMP_VALUES:
        raise ConfigError(f"amp={amp!r}: must be one of {', '.join(AMP_VALUES)}")
    support = bf16_support(device)
    if support.fast:
        return True
    if amp == "bf16" and support.device not in _WARNED:
        _WARNED.add(support.device)
        slower = (
            f"measured {support.factor:.1f}x the float32 time"
            if support.factor is not None
            else "expected to be slower than float32"
        )
        log.warning(
            "%s=bf16 ignored: bfloat16 is slow on this %s (%s; %s), so this runs in float32. "
            "Use amp=bf16! to force bf16, or amp=auto to choose silently.",
            who,
            support.device,
            slower,
            support.how,
        )
    return False


def effective_precision(amp: str, device: torch.device | str = "cpu") -> str:
    """`bf16` or `fp32`: what `amp` runs as on `device` (no warning)."""
    if amp in ("off", "bf16!"):
        return "bf16" if amp == "bf16!" else "fp32"
    return "bf16" if bf16_support(device).fast else "fp32"


def precision_record(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What results files record: the detection for `device` (and the CPU's facts)."""
    support = bf16_support(device)
    return {**support.as_dict(), "summary": support.summary()}


def precision_label(bf16_used: float | None, amp_code: float | None) -> str:
    """The speed table's precision cell from the tidy rows' `bf16` (used: 1/0) and `amp_requested`
    (AMP_CODES): the precision that ran, and why when it is not plainly the setting."""
    if bf16_used is None or amp_code is None or bf16_used != bf16_used or amp_code != amp_code:  # NaN
        return "-"
    amp = {v: k for k, v in AMP_CODES.items()}.get(int(amp_code), "?")
    used = "bf16" if bf16_used >= 0.5 else "fp32"
    if amp == "bf16" and used == "fp32":
        return "fp32 (bf16 slow here)"
    return {"auto": f"{used} (auto)", "bf16!": f"{used} (forced)"}.get(amp, used)
