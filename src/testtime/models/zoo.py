"""Model registry: architectures by name and the source models shipped with the package."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from testtime.errors import ConfigError, ModelError
from testtime.models.digits import DigitNet
from testtime.models.resnet import CifarResNet
from testtime.utils import sha256_file

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": lambda: CifarResNet(depth=20),
    "resnet26": lambda: CifarResNet(depth=26),
    "digitnet": DigitNet,
}


@dataclass(frozen=True)
class ShippedModel:
    """A source model whose weights ship inside the package."""

    name: str
    arch: str
    dataset: str
    file: str
    sha256: str
    description: str


SHIPPED: dict[str, ShippedModel] = {
    m.name: m
    for m in [
        ShippedModel(
            name="cifar10_resnet26",
            arch="resnet26",
            dataset="cifar10",
            file="cifar10_resnet26.pt",
            sha256="7f14361a539daf6b56b243a22af12081e9bce5664c0e0e4f668f77998488676a",
            description="CIFAR ResNet-26 (BatchNorm), `testtime train-source`, 48 epochs, seed 0 "
            "(CIFAR-10 test error 11.37%)",
        ),
        ShippedModel(
            name="mnist_digitnet",
            arch="digitnet",
            dataset="mnist",
            file="mnist_digitnet.pt",
            sha256="44354699c77a8bbe4e33f90aec6976fa6cf5ccd94d39aa22f11a7e2ba5277ea7",
            description="DigitNet (BatchNorm) on MNIST as 32x32 RGB, 10 epochs, seed 0 (MNIST test error 0.37%)",
        ),
        ShippedModel(
            name="usps_digitnet",
            arch="digitnet",
            dataset="usps",
            file="usps_digitnet.pt",
            sha256="78f1a8543c1fe2d2f1f153eed4ce7d9e98e982b6cfa5c9dcada2f9718b288f31",
            description="DigitNet (BatchNorm) on USPS as 32x32 RGB, 30 epochs, seed 0 (USPS test error 2.29%)",
        ),
    ]
}
DEFAULT_MODEL = "cifar10_resnet26"


def build_model(arch: str) -> nn.Module:
    """A randomly initialised model of a registered architecture."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch]()


def load_state(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict with `weights_only=True`, checking the sha256 when given."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ModelError(f"{path}: sha256 mismatch (file corrupted or replaced); expected {sha256}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or ["empty or truncated file"])[0]
        raise ModelError(f"{path}: cannot load weights ({type(e).__name__}: {first})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise ModelError(f"{source}: weights do not fit {type(model).__name__} ({' '.join(first)})") from e
    return model.eval()


def load_model(
    name: str = DEFAULT_MODEL, path: str | os.PathLike | None = None, arch: str | None = None
) -> nn.Module:
    """A shipped source model by name, or `arch` loaded from a user weights file at `path`."""
    if path is not None:
        arch = arch or (SHIPPED[name].arch if name in SHIPPED else None)
        if arch is None:
            raise ConfigError("loading weights from a path needs an architecture (arch=...)")
        return load_weights(build_model(arch), load_state(path), str(path))
    if name not in SHIPPED:
        raise ConfigError(f"unknown model {name!r}; shipped models: {', '.join(SHIPPED) or 'none'}")
    spec = SHIPPED[name]
    ref = resources.files("testtime.models") / "weights" / spec.file
    with resources.as_file(ref) as p:
        state = load_state(p, spec.sha256)
    return load_weights(build_model(spec.arch), state, f"shipped model {name}")
