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
from tiny_net import TinyResNet  # noqa: E402


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyResNet()


@pytest.fixture
def tiny_net_cls():
    return TinyResNet
