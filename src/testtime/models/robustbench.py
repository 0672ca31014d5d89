"""Architectures of RobustBench corruption models, written so their checkpoints load unchanged.

Parameter and buffer names follow RobustBench's model definitions exactly (the WideResNet of
TRADES/RobustBench `wide_resnet.py` and the CIFAR ResNeXt of the AugMix code, RobustBench
`resnext.py`), so a state dict from `robustbench.utils.load_model` or from RobustBench's download
cache loads with `strict=True`. Input normalisation lives in a `normalize` module with
non-persistent buffers (inputs are always in [0, 1]); it is part of each model's definition, never
of its checkpoint:

- CIFAR-10 `Standard` (WRN-28-10): no normalisation, the network sees [0, 1] inputs.
- `Hendrycks2020AugMix_ResNeXt` (ResNeXt-29, cardinality 4, base width 32): (x - 0.5) / 0.5, the
  `mu`/`sigma` buffers of RobustBench's `Hendrycks2020AugMixResNeXtNet`. Their checkpoint does not
  hold `mu`/`sigma` (RobustBench loads it non-strictly and keeps the 0.5 defaults); a state dict
  saved from a RobustBench model object does, and then those values are used.

The forward passes compute the same function as RobustBench's (the 8x8 average pool at the end is
a global average pool for 32x32 inputs; here it is global for any input size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from testtime.models.resnet import Normalize

IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
AUGMIX_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------- WideResNet
class WideBasicBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv twice); names as RobustBench's `wide_resnet.BasicBlock`."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # a 1x1 projection when the width changes (stride is then also applied by it)
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # with a projection the shortcut starts from the activated input, else from x itself
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """`nb_layers` blocks in `self.layer` (the extra level of nesting is part of the key names)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs (Zagoruyko & Komodakis 2016; TRADES/RobustBench layout).

    `depth` must be 6n+4 (10, 16, 28, 34, 40, ...); n blocks per stage, widths 16k, 32k, 64k.
    `forward_features` returns the pooled penultimate features; `fc` is the classifier.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        mean: tuple[float, ...] = IDENTITY_NORM[0],
        std: tuple[float, ...] = IDENTITY_NORM[1],
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# ----------------------------------------------------------------------------- ResNeXt
class ResNeXtBottleneck(nn.Module):
    """ResNeXt block type C (grouped 3x3 conv); names as in the AugMix / RobustBench code."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        cardinality: int,
        base_width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dim = math.floor(planes * (base_width / 64.0))
        inner = dim * cardinality
        self.conv_reduce = nn.Conv2d(inplanes, inner, 1, 1, 0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.conv_conv = nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(inner)
        self.conv_expand = nn.Conv2d(inner, planes * self.expansion, 1, 1, 0, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(residual + out)


class CifarResNeXt(nn.Module):
    """ResNeXt for 32x32 inputs (Xie et al. 2017) as used by AugMix: stem 64, stages 64/128/256 x 4.

    `depth` must be 9n+2 (11, 20, 29, ...), n blocks per stage. The AugMix ResNeXt-29 is
    `CifarResNeXt(depth=29, cardinality=4, base_width=32)`. The classifier is called `classifier`
    (RobustBench's name); `fc` is an alias that is not a separate module in the state dict.
    """

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 4,
        base_width: int = 32,
        num_classes: int = 100,
        mean: tuple[float, ...] = AUGMIX_NORM[0],
        std: tuple[float, ...] = AUGMIX_NORM[1],
    ) -> None:
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise ValueError(f"CifarResNeXt depth must be 9n+2 (11, 20, 29, ...), got {depth}")
        n = (depth - 2) // 9
        self.depth, self.cardinality, self.base_width = depth, cardinality, base_width
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        self._inplanes = 64
        self.stage_1 = self._make_stage(64, n, 1)
        self.stage_2 = self._make_stage(128, n, 2)
        self.stage_3 = self._make_stage(256, n, 2)
        self.feature_dim = 256 * ResNeXtBottleneck.expansion
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * ResNeXtBottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )
        layers = [
            ResNeXtBottleneck(self._inplanes, planes, self.cardinality, self.base_width, stride, downsample)
        ]
        self._inplanes = out_planes
        layers += [
            ResNeXtBottleneck(out_planes, planes, self.cardinality, self.base_width) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    @property
    def fc(self) -> nn.Linear:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_1(self.conv_1_3x3(self.normalize(x))))
        out = self.stage_3(self.stage_2(self.stage_1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
