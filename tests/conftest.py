"""Shared fixtures: real data when available, small models, state hashing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from testtime.data.cifar import load_embedded_cifar10
from testtime.models.vit import ViT
from testtime.utils import state_digest

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# `testtime run` arguments for a run of a few seconds: the source model on 50 gaussian_noise images
TINY_RUN = [
    "-m",
    "source",
    "--corruptions",
    "gaussian_noise",
    "--n-per-domain",
    "50",
    "-b",
    "25",
    "--threads",
    "1",
]


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (or $TESTTIME_DATA), if present."""
    if os.environ.get("TESTTIME_DATA"):
        p = Path(os.environ["TESTTIME_DATA"])
        return p if p.is_dir() else None
    for base in Path(__file__).resolve().parents:
        cand = base / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("shared/data not found (set TESTTIME_DATA); test needs the real datasets")
    return d


@pytest.fixture(scope="session")
def embedded():
    return load_embedded_cifar10()


@pytest.fixture(scope="session")
def source_model():
    from testtime.models.zoo import load_model

    return load_model()


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter, buffer and extra state (names, dtypes, shapes, values).

    The usage counters of an `AdaptedModel` (images seen, passes) are bookkeeping that survives
    `reset()` by design, so they are left out.
    """
    from testtime.adapt.base import AdaptedModel

    return state_digest(
        module,
        exclude=module.bookkeeping_keys() if isinstance(module, AdaptedModel) else AdaptedModel.COUNTERS,
    )


def to_batch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(255)


@pytest.fixture(scope="session")
def noisy_stream(embedded):
    """400 embedded test images with severity-5 impulse noise (our CIFAR-10-C generator).

    Impulse rather than Gaussian noise: the shipped source model is unusually robust to Gaussian
    noise (about 32% error at severity 5), which leaves too little headroom for adaptation tests.
    """
    from testtime.data.corruptions import corrupt

    idx = np.random.default_rng(0).permutation(len(embedded))[:400]
    x = corrupt(embedded.x[idx], "impulse_noise", 5, seed=0)
    return to_batch(x), torch.from_numpy(embedded.y[idx])


def _bookkeeping() -> set[str]:
    from testtime.adapt.base import AdaptedModel

    # usage counters and the collapse guard's observation window: not adaptation state
    return set(AdaptedModel.COUNTERS) | {"guard.preds", "guard.pos", "guard.entropy_ema"}


BOOKKEEPING = _bookkeeping()


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """State-dict keys whose tensors differ (use on `adapted.state_dict()` snapshots)."""
    return {k for k, v in before.items() if isinstance(v, torch.Tensor) and not torch.equal(v, after[k])}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def bn_affine_keys(model: torch.nn.Module, prefix: str = "model.") -> set[str]:
    """State-dict keys of BatchNorm(-replacement) affine parameters under `prefix`."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from testtime.adapt.components.norm import AdaptiveNorm

    return {
        f"{prefix}{n}.{p}"
        for n, m in model.named_modules()
        if isinstance(m, (_BatchNorm, AdaptiveNorm))
        for p in ("weight", "bias")
    }


# tiny non-BN models shared by the norm-type tests and the recipes' norm-type checks
def tiny_gn() -> torch.nn.Module:
    """A user-style GroupNorm CNN (plain nn.GroupNorm behind frozen-able convolutions), 8x8 RGB."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )  # fmt: skip


def tiny_ln() -> torch.nn.Module:
    """A two-block pre-norm ViT (LayerNorm) on 8x8 RGB with 2x2 patches."""
    torch.manual_seed(0)
    return ViT(image_size=8, patch_size=2, dim=16, depth=2, heads=2, mlp_ratio=2.0)
