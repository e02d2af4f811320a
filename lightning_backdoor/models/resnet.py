"""CIFAR-style residual networks (He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016): ResNet-18/34 with a 3x3 stem and ResNet-20 of the paper's Sec. 4.2."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ._base import ImageClassifier, check_int_at_least, init_weights
from ._factory import MODELS

_Stat = Sequence[float] | float | Tensor | None


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers plus a shortcut; a 1x1 Conv-BN projection when the shape changes.

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.rand(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(ImageClassifier):
    """A ResNet of BasicBlocks for small images (He et al., CVPR 2016).

    Stem: 3x3 stride-1 Conv-BN-ReLU with ``width`` channels and no max pool; stage ``i``
    (``layer1``, ``layer2``, ...) has ``num_blocks[i]`` blocks with ``width * 2**i`` channels and
    stride 2 from the second stage on; then adaptive average pooling and a linear head ``fc``.
    Use the factories :func:`resnet18`, :func:`resnet34`, :func:`resnet20`.

    Args:
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: number of classes (>= 2).
        in_channels: input channels.
        mean, std: statistics of the built-in ``Normalize`` (None: identity).
        width: channels of the stem and first stage (64 for ResNet-18/34, 16 for ResNet-20).

    Example:
        >>> CifarResNet((1, 1), width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        mean: _Stat = None,
        std: _Stat = None,
        width: int = 64,
    ) -> None:
        super().__init__(num_classes, in_channels, mean, std)
        if isinstance(num_blocks, (str, bytes)) or not isinstance(num_blocks, Sequence) or not num_blocks:
            raise TypeError(f"num_blocks must be a non-empty sequence of ints (blocks per stage), got {num_blocks!r}")
        self.num_blocks = tuple(check_int_at_least(n, "num_blocks[i]", 1) for n in num_blocks)
        self.width = check_int_at_least(width, "width", 1)

        self.conv1 = nn.Conv2d(self.in_channels, self.width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.width)
        self.relu = nn.ReLU()
        in_planes = self.width
        self.stage_names = []
        for i, n in enumerate(self.num_blocks):
            planes = self.width * 2**i
            blocks = [BasicBlock(in_planes, planes, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, self.num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.preprocess(x)
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:  # fixed at construction: unrolled by fx, not data-dependent
            x = getattr(self, name)(x)
        return torch.flatten(self.avgpool(x), 1)


@MODELS.register("resnet18")
def resnet18(
    num_classes: int = 10, in_channels: int = 3, mean: _Stat = None, std: _Stat = None, width: int = 64
) -> CifarResNet:
    """CIFAR-style ResNet-18: BasicBlocks ``[2, 2, 2, 2]``, widths ``width * (1, 2, 4, 8)``
    (~11.17M parameters at ``width=64``, 10 classes).

    Example:
        >>> resnet18(width=16)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels, mean, std, width=width)


@MODELS.register("resnet34")
def resnet34(
    num_classes: int = 10, in_channels: int = 3, mean: _Stat = None, std: _Stat = None, width: int = 64
) -> CifarResNet:
    """CIFAR-style ResNet-34: BasicBlocks ``[3, 4, 6, 3]``, widths ``width * (1, 2, 4, 8)``.

    Example:
        >>> resnet34(width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels, mean, std, width=width)


@MODELS.register("resnet20")
def resnet20(
    num_classes: int = 10, in_channels: int = 3, mean: _Stat = None, std: _Stat = None, width: int = 16
) -> CifarResNet:
    """ResNet-20 for CIFAR-10 (He et al., 2016, Sec. 4.2, n=3): three stages of three BasicBlocks
    with ``width * (1, 2, 4)`` = 16/32/64 channels (~0.27M parameters). Shortcuts that change shape
    use 1x1 Conv-BN projections (the paper's option B) rather than zero padding (option A).

    Example:
        >>> resnet20()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarResNet((3, 3, 3), num_classes, in_channels, mean, std, width=width)
