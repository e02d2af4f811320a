"""``TinyResNet``: a few BN layers and a residual connection, small enough for seconds-long tests.

Importable as ``from tiny_net import TinyResNet`` (``from conftest import ...`` is ambiguous once several
``conftest.py`` files are loaded); tests/conftest.py exposes it as the ``tiny_net``/``tiny_net_cls`` fixtures.
"""

import torch
from torch import nn


class TinyResNet(nn.Module):
    """A few BN layers with a residual connection: small enough for seconds-long tests, IBD-PSC-compatible."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(h + self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(h))))))
        return self.fc(torch.flatten(self.pool(h), 1))
