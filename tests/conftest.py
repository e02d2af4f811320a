"""Test-wide settings: W&B never goes online, no network, quiet logs."""

import os

# Online W&B with no server hangs for minutes; every test runs offline (or disabled where it sets so).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # loopback discard port: nothing leaves this machine

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


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


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyResNet()


@pytest.fixture
def tiny_net_cls():
    return TinyResNet
