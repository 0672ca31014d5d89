"""ImageNet classifiers from torchvision and timm (the optional `testtime[imagenet]` extra).

Names: `torchvision:<arch>[:<weights>]` (default weights IMAGENET1K_V1, what `pretrained=True`
gave and what Tent/EATA/SAR and RobustBench's `Standard_R50` use) and `timm:<model name>` (e.g.
`timm:vit_base_patch16_224.augreg2_in21k_ft_in1k`, the ViT-B/16 of SAR/DeYO). Neither package is
imported until such a model is requested; without it the error names the extra to install.

Every model is wrapped in `Normalized`, which holds the model's own input normalisation, so
inputs are in [0, 1] as everywhere in testtime: torchvision weights carry ImageNet mean/std in
their preset transforms; timm models carry theirs in `pretrained_cfg` (many timm ViTs use 0.5/0.5,
not the ImageNet statistics; using the wrong one silently costs accuracy).
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from testtime.errors import ConfigError, ModelError
from testtime.models.resnet import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_DEFAULT_WEIGHTS = "IMAGENET1K_V1"
PREFIXES = ("torchvision:", "timm:")
EXAMPLES = {
    "torchvision:resnet50": "ResNet-50, torchvision IMAGENET1K_V1 (RobustBench Standard_R50); ImageNet mean/std",
    "torchvision:vit_b_16": "ViT-B/16, torchvision IMAGENET1K_V1; ImageNet mean/std",
    "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k": "ViT-B/16 (timm, SAR/DeYO); mean/std 0.5 from pretrained_cfg",
}


class Normalized(nn.Module):
    """`net(normalize(x))`: a network that takes inputs in [0, 1] and normalises them itself."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(tuple(float(m) for m in mean), tuple(float(s) for s in std))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def is_imagenet_name(name: str) -> bool:
    return name.startswith(PREFIXES)


def require(package: str, what: str) -> ModuleType:
    """Import an optional package or raise one ConfigError naming the extra that provides it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(
            f"{what} needs {package}, which is not installed ({e}); "
            "install the ImageNet extra: pip install 'testtime[imagenet]'"
        ) from None


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$TESTTIME_CACHE/models`, else `~/.cache/testtime/models`."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("TESTTIME_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "testtime") / "models"


def load_imagenet_model(
    name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """A torchvision/timm model by name; weights from `path` when given, else downloaded (cached)."""
    if name.startswith("torchvision:"):
        return _torchvision(name, path, cache_dir)
    if name.startswith("timm:"):
        return _timm(name, path, cache_dir)
    raise ConfigError(f"not an ImageNet model name: {name!r} (use torchvision:<arch> or timm:<model>)")


def _load_user_weights(net: nn.Module, name: str, path: str | os.PathLike) -> None:
    from testtime.models.zoo import load_state, load_weights

    load_weights(net, load_state(path), f"{path} (for {name})")


def _torchvision(name: str, path: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> nn.Module:
    parts = name.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ConfigError(f"torchvision model names are torchvision:<arch>[:<weights>], got {name!r}")
    arch = parts[1]
    tag = parts[2] if len(parts) == 3 else TORCHVISION_DEFAULT_WEIGHTS
    tv = require("torchvision", name)
    try:
        enum = tv.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError(
            f"unknown torchvision model {arch!r} (see torchvision.models.list_models())"
        ) from None
    try:
        weights = enum[tag]
    except KeyError:
        known = ", ".join(w.name for w in enum)
        raise ConfigError(f"{arch} has no torchvision weights {tag!r}; known: {known}") from None
    preset = weights.transforms()
    mean = tuple(getattr(preset, "mean", IMAGENET_MEAN))
    std = tuple(getattr(preset, "std", IMAGENET_STD))
    net = tv.models.get_model(arch, weights=None, num_classes=len(weights.meta["categories"]))
    if path is not None:
        _load_user_weights(net, name, path)
    else:
        folder = model_cache_dir(cache_dir) / "torchvision"
        try:
            state = torch.hub.load_state_dict_from_url(
                weights.url,
                model_dir=str(folder),
                map_location="cpu",
                progress=False,
                check_hash=True,
                weights_only=True,
            )
        except Exception as e:
            raise ModelError(
                f"cannot download {name} weights from {weights.url} ({type(e).__name__}: {e}); "
                f"download the file yourself and pass it as the weights path (--model-path), "
                f"or put it in {folder}"
            ) from None
        net.load_state_dict(state, strict=True)
    return Normalized(net, mean, std).eval()


def _timm(name: str, path: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> nn.Module:
    model_name = name[len("timm:") :]
    if not model_name:
        raise ConfigError("timm model names are timm:<model name>, e.g. timm:vit_base_patch16_224")
    timm = require("timm", name)
    kwargs = {}
    if path is None and "cache_dir" in inspect.signature(timm.create_model).parameters:
        kwargs["cache_dir"] = str(model_cache_dir(cache_dir) / "timm")
    try:
        net = timm.create_model(model_name, pretrained=path is None, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "unknown model" in str(e).lower():
            raise ConfigError(f"unknown timm model {model_name!r} (see timm.list_models())") from None
        raise ModelError(f"cannot create {name} ({type(e).__name__}: {e})") from None
    except Exception as e:  # download failures (offline, hub errors)
        raise ModelError(
            f"cannot load {name} pretrained weights ({type(e).__name__}: {e}); download the checkpoint "
            "yourself and pass it as the weights path (--model-path)"
        ) from None
    if path is not None:
        _load_user_weights(net, name, path)
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return Normalized(net, mean, std).eval()
