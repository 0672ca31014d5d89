"""A small BatchNorm CNN for 32x32 digit images (MNIST <-> USPS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from testtime.models.resnet import Normalize


class DigitNet(nn.Module):
    """LeNet-style CNN with BatchNorm: two 5x5 conv blocks, a 128-d feature layer, a linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.conv1 = nn.Conv2d(3, 32, 5, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 5 * 5, 128, bias=False)
        self.bn3 = nn.BatchNorm1d(128)
        self.feature_dim = 128
        self.fc = nn.Linear(128, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(self.normalize(x)))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return F.relu(self.bn3(self.fc1(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
