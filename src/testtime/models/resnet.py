"""CIFAR-style pre-defined ResNets with BatchNorm or GroupNorm (He et al. 2016, CIFAR variant)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel input normalisation kept inside the model, so inputs are always in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


NormFactory = Callable[[int], nn.Module]


class GroupNorm2d(nn.GroupNorm):
    """GroupNorm that normalises a contiguous (NCHW) copy of channels_last inputs: torch 2.13's CPU
    GroupNorm backward crashes (segfault) on channels_last input when only the affine parameters
    need gradients, which is what norm-affine test-time adaptation (Tent, SAR, ...) asks for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def norm_factory(norm: str = "bn", groups: int = 8) -> NormFactory:
    """A constructor `channels -> layer`: BatchNorm2d (`"bn"`) or GroupNorm with `groups` groups (`"gn"`)."""
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        if groups < 1:
            raise ValueError(f"GroupNorm needs groups >= 1, got {groups}")
        return lambda channels: GroupNorm2d(groups, channels)
    raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `depth=26` gives 4 blocks per stage.

    `forward_features` returns the pooled penultimate features and `fc` is the linear
    classifier, which feature-space methods (T3A, AdaNPC, CAFA, LAME) use.

    `norm="gn"` replaces every BatchNorm by GroupNorm with `groups` groups (8 by default, as the
    GroupNorm ResNet-26 of the reference benchmark, mariodoebler/test-time-adaptation
    `models/resnet26.py::build_resnet26(groups=8)`, after TTT/MEMO); the layers keep the names
    `bn1`, `bn2` and `shortcut.1`, so only the running-statistics buffers differ in the state dict.
    """

    def __init__(
        self,
        depth: int = 26,
        width: int = 16,
        num_classes: int = 10,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        in_channels: int = 3,
        norm: str = "bn",
        groups: int = 8,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n+2 (20, 26, 32, ...), got {depth}")
        if norm == "gn" and width % groups != 0:
            raise ValueError(f"width {width} must be a multiple of the GroupNorm groups ({groups})")
        make_norm = norm_factory(norm, groups)
        n = (depth - 2) // 6
        self.depth, self.width, self.num_classes, self.norm = depth, width, num_classes, norm
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = make_norm(width)
        layers, in_planes = [], width
        for i, mult in enumerate((1, 2, 4)):
            planes = width * mult
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, make_norm))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
