"""Model registry: architectures by name, the source models shipped with the package, and
published models users download or already have (RobustBench corruption models; torchvision/timm
ImageNet models through the optional `testtime[imagenet]` extra)."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from testtime.errors import ConfigError, ModelError
from testtime.models.digits import DigitNet
from testtime.models.imagenet import EXAMPLES as IMAGENET_EXAMPLES
from testtime.models.imagenet import is_imagenet_name, load_imagenet_model, model_cache_dir
from testtime.models.resnet import CifarResNet
from testtime.models.robustbench import AUGMIX_NORM, CifarResNeXt, WideResNet
from testtime.models.vit import ViT
from testtime.utils import load_weights_only, sha256_file

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": lambda: CifarResNet(depth=20),
    "resnet26": lambda: CifarResNet(depth=26),
    # GroupNorm with 8 groups: the reference benchmark's GN ResNet-26 (mariodoebler/test-time-adaptation)
    "resnet26_gn": lambda: CifarResNet(depth=26, norm="gn", groups=8),
    # LayerNorm ViT, patch 4 on 32x32: 6 pre-norm blocks of width 192 (3 heads, MLP 384), mean pooling
    "vit_tiny_p4": lambda: ViT(patch_size=4, dim=192, depth=6, heads=3, mlp_ratio=2.0),
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
            name="cifar10_resnet26_gn",
            arch="resnet26_gn",
            dataset="cifar10",
            file="cifar10_resnet26_gn.pt",
            sha256="37bb846a2dd253b99a2fd25c5e95a65df6de7984c0cd4d45c9d331b7973ba3ad",
            description="CIFAR ResNet-26 with GroupNorm (8 groups), `testtime train-source`, 48 epochs, "
            "seed 0 (CIFAR-10 test error 13.16%)",
        ),
        ShippedModel(
            name="cifar10_vit",
            arch="vit_tiny_p4",
            dataset="cifar10",
            file="cifar10_vit.pt",
            sha256="39f784706f952bd2d5b3ad32b1d02916ae670266831e050a6b08ac2a9fa50b8c",
            description="ViT with LayerNorm (patch 4, 6 blocks, width 192), `testtime train-source`, 100 "
            "epochs, seed 0 (CIFAR-10 test error 16.48%)",
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
DEFAULT_MODELS = {  # the model a benchmark uses on each dataset when none is named
    "cifar10": DEFAULT_MODEL,
    "cifar100": "robustbench:cifar100:Hendrycks2020AugMix_ResNeXt",
    "imagenet_c": "torchvision:resnet50",
    "mnist_usps": "mnist_digitnet",
    "usps_mnist": "usps_digitnet",
}


def cell_model_name(dataset: str, model: str | None) -> str:
    """The model a benchmark cell of `dataset` runs: the one named, else the dataset's default."""
    return model or DEFAULT_MODELS.get(dataset, DEFAULT_MODEL)


@dataclass(frozen=True)
class RobustBenchModel:
    """A RobustBench corruption model: our implementation of its architecture, loading its checkpoint.

    `name` is RobustBench's model id; the testtime name is `robustbench:<dataset>:<name>`. The
    checkpoint is the file RobustBench downloads (`<dataset>/corruptions/<name>.pt` under its
    model_dir) from Google Drive `gdrive_id`.
    """

    name: str
    dataset: str  # cifar10 | cifar100
    num_classes: int
    arch: str
    normalization: str
    build: Callable[[], nn.Module]
    gdrive_id: str

    @property
    def full_name(self) -> str:
        return f"robustbench:{self.dataset}:{self.name}"

    @property
    def relpath(self) -> Path:
        return Path(self.dataset) / "corruptions" / f"{self.name}.pt"


def _augmix_wrn(num_classes: int) -> nn.Module:
    return WideResNet(
        depth=40, widen_factor=2, num_classes=num_classes, mean=AUGMIX_NORM[0], std=AUGMIX_NORM[1]
    )


ROBUSTBENCH: dict[str, RobustBenchModel] = {
    m.full_name: m
    for m in [
        RobustBenchModel(
            "Standard",
            "cifar10",
            10,
            "WRN-28-10",
            "none (inputs in [0, 1])",
            lambda: WideResNet(depth=28, widen_factor=10, num_classes=10),
            "1t98aEuzeTL8P7Kpd5DIrCoCL21BNZUhC",
        ),
        RobustBenchModel(
            "Hendrycks2020AugMix_ResNeXt",
            "cifar10",
            10,
            "ResNeXt-29 (cardinality 4, base width 32)",
            "(x - 0.5) / 0.5",
            lambda: CifarResNeXt(depth=29, cardinality=4, base_width=32, num_classes=10),
            "1uGP3nZbL3LC160kOsxwkkt6tDd4qbZT1",
        ),
        RobustBenchModel(
            "Hendrycks2020AugMix_WRN",
            "cifar10",
            10,
            "WRN-40-2",
            "(x - 0.5) / 0.5",
            lambda: _augmix_wrn(10),
            "1wy7gSRsUZzCzj8QhmTbcnwmES_2kkNph",
        ),
        RobustBenchModel(
            "Hendrycks2020AugMix_ResNeXt",
            "cifar100",
            100,
            "ResNeXt-29 (cardinality 4, base width 32)",
            "(x - 0.5) / 0.5",
            lambda: CifarResNeXt(depth=29, cardinality=4, base_width=32, num_classes=100),
            "1ocnHbvDdOBLvgNr6K7vEYL08hUdkD1Rv",
        ),
        RobustBenchModel(
            "Hendrycks2020AugMix_WRN",
            "cifar100",
            100,
            "WRN-40-2",
            "(x - 0.5) / 0.5",
            lambda: _augmix_wrn(100),
            "1XpFFdCdU9LcDtcyNfo6_BV1RZHKKkBVE",
        ),
    ]
}
GDRIVE_URL = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"


@dataclass(frozen=True)
class ModelInfo:
    """What a model name implies about its inputs and outputs."""

    name: str
    dataset: str  # cifar10 | cifar100 | mnist | usps | imagenet
    num_classes: int
    input_size: int


def model_info(name: str) -> ModelInfo:
    """Dataset, number of classes and input size of a model name (shipped, RobustBench, ImageNet)."""
    if name in SHIPPED:
        return ModelInfo(name, SHIPPED[name].dataset, 10, 32)
    if name in ROBUSTBENCH:
        m = ROBUSTBENCH[name]
        return ModelInfo(name, m.dataset, m.num_classes, 32)
    if is_imagenet_name(name):
        return ModelInfo(name, "imagenet", 1000, 224)
    raise ConfigError(f"unknown model {name!r}; {known_models_hint()}")


def is_known_model(name: str) -> bool:
    return name in SHIPPED or name in ROBUSTBENCH or is_imagenet_name(name)


def known_models_hint() -> str:
    return (
        f"shipped models: {', '.join(SHIPPED)}; RobustBench: {', '.join(ROBUSTBENCH)}; "
        "ImageNet (testtime[imagenet]): torchvision:<arch>[:<weights>], timm:<model>"
    )


def build_model(arch: str) -> nn.Module:
    """A randomly initialised model of a registered architecture."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch]()


def load_state(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict with `weights_only=True`, checking the sha256 when given.

    Accepts a raw state dict or a checkpoint holding one under `model` or `state_dict`; a
    `module.` prefix on every key (nn.DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ModelError(f"{path}: sha256 mismatch (file corrupted or replaced); expected {sha256}")
    state = load_weights_only(path, ModelError, "cannot load weights")
    for key in ("model", "state_dict"):  # a training checkpoint
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return strip_prefix(state, "module.")


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`state` with `prefix` removed from its keys when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """One line naming missing/unexpected keys and shape mismatches (a few examples of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = _mismatch(model, state) or " ".join(str(e).splitlines()[0:2])
        raise ModelError(f"{source}: weights do not fit {type(model).__name__} ({detail})") from e
    return model.eval()


def robustbench_cache_path(spec: RobustBenchModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a downloaded RobustBench checkpoint is kept: `<models cache>/robustbench/<dataset>/corruptions/<name>.pt`."""
    return model_cache_dir(cache_dir) / "robustbench" / spec.relpath


def download_robustbench(
    spec: RobustBenchModel, cache_dir: str | os.PathLike | None = None, url: str | None = None
) -> Path:
    """Download `spec`'s checkpoint from Google Drive (or `url`) into the cache; return its path."""
    dest = robustbench_cache_path(spec, cache_dir)
    if dest.is_file():
        return dest
    url = url or GDRIVE_URL.format(id=spec.gdrive_id)
    manual = (
        f"download it yourself (RobustBench: robustbench.utils.load_model({spec.name!r}, "
        f"dataset={spec.dataset!r}, threat_model='corruptions'), or {url}) and pass the file as "
        f"the weights path (--model-path FILE), or put it at {dest}"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot download {spec.full_name} ({type(e).__name__}: {e}); {manual}") from None
    with open(tmp, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype", b"<html")):
        tmp.unlink(missing_ok=True)
        raise ModelError(
            f"cannot download {spec.full_name}: Google Drive answered with a web page instead of the "
            f"file (download quota or a changed link); {manual}"
        )
    try:  # a cut-off transfer must not stay in the cache
        load_state(tmp)
    except ModelError as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(
            f"download of {spec.full_name} is not a readable checkpoint ({e}); {manual}"
        ) from None
    os.replace(tmp, dest)
    return dest


def load_robustbench(
    name: str,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    build: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """A RobustBench corruption model from a user checkpoint at `path`, else the cache / a download.

    Without `path`, looks for `<models cache>/robustbench/<dataset>/corruptions/<name>.pt`, then
    RobustBench's own default `./models/<dataset>/corruptions/<name>.pt`, then downloads. Handles
    RobustBench checkpoint layouts: a raw state dict or `{"state_dict": ...}`, keys prefixed with
    `module.` and/or `model.`, and `mu`/`sigma` normalisation buffers (used when present).
    `build` replaces the architecture constructor (tests use smaller variants).
    """
    if name not in ROBUSTBENCH:
        raise ConfigError(f"unknown RobustBench model {name!r}; known: {', '.join(ROBUSTBENCH)}")
    spec = ROBUSTBENCH[name]
    if path is None:
        local = Path("models") / spec.relpath
        cached = robustbench_cache_path(spec, cache_dir)
        if cached.is_file():
            path = cached
        elif local.is_file():
            path = local
        else:
            path = download_robustbench(spec, cache_dir)
    state = strip_prefix(strip_prefix(load_state(path), "module."), "model.")
    model = (build or spec.build)()
    norm = {k: state.pop(k) for k in ("mu", "sigma") if k in state}
    if norm:
        if set(norm) != {"mu", "sigma"} or any(v.numel() != 3 for v in norm.values()):
            raise ModelError(f"{path}: malformed mu/sigma normalisation buffers for {name}")
        if bool((norm["sigma"] <= 0).any()):
            raise ModelError(f"{path}: sigma must be positive, got {norm['sigma'].flatten().tolist()}")
        model.normalize.mean.copy_(norm["mu"].view(1, 3, 1, 1))
        model.normalize.std.copy_(norm["sigma"].view(1, 3, 1, 1))
    return load_weights(model, state, f"{path} (for {name}, {spec.arch})")


def load_model(
    name: str = DEFAULT_MODEL,
    path: str | os.PathLike | None = None,
    arch: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """A model by name: shipped (weights in the package), `robustbench:<dataset>:<id>`, or
    `torchvision:<arch>` / `timm:<model>` (needs testtime[imagenet]). `path` is a user weights
    file: with `arch` it holds that architecture's weights (whatever the name); otherwise, for
    RobustBench and ImageNet names it replaces the download, and shipped names imply their
    architecture. Downloads are cached under
    `cache_dir`, else `$TESTTIME_CACHE/models`, else `~/.cache/testtime/models`.
    """
    if path is not None and arch is not None:  # an explicit architecture wins over the name
        return load_weights(build_model(arch), load_state(path), str(path))
    if name in ROBUSTBENCH or name.startswith("robustbench:"):
        return load_robustbench(name, path, cache_dir)
    if is_imagenet_name(name):
        return load_imagenet_model(name, path, cache_dir)
    if path is not None:
        arch = arch or (SHIPPED[name].arch if name in SHIPPED else None)
        if arch is None:
            raise ConfigError("loading weights from a path needs an architecture (arch=...)")
        return load_weights(build_model(arch), load_state(path), str(path))
    if name not in SHIPPED:
        raise ConfigError(f"unknown model {name!r}; {known_models_hint()}")
    spec = SHIPPED[name]
    ref = resources.files("testtime.models") / "weights" / spec.file
    with resources.as_file(ref) as p:
        state = load_state(p, spec.sha256)
    return load_weights(build_model(spec.arch), state, f"shipped model {name}")


def published_models() -> dict[str, str]:
    """Models with published weights (downloaded or user-supplied): name -> description."""
    out = {
        k: f"{m.arch}, {m.num_classes} classes, normalisation {m.normalization} (RobustBench corruptions)"
        for k, m in ROBUSTBENCH.items()
    }
    out.update(IMAGENET_EXAMPLES)
    return out
