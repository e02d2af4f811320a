"""Small CNNs: the BadNets MNIST network and a cheap Conv-BN-ReLU model for tests and CPU runs."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from ._base import ImageClassifier, check_int_at_least, init_weights
from ._factory import MODELS


def _input_hw(input_size: int | Sequence[int]) -> Tuple[int, int]:
    if isinstance(input_size, (list, tuple)) and len(input_size) == 2:
        h, w = input_size
    elif isinstance(input_size, int) and not isinstance(input_size, bool):
        h = w = input_size
    else:
        raise TypeError(f"input_size must be an int or an (height, width) pair, got {input_size!r}")
    return check_int_at_least(h, "input_size height", 1), check_int_at_least(w, "input_size width", 1)


@MODELS.register("badnets_cnn")
class BadNetsCNN(ImageClassifier):
    """The MNIST CNN of BadNets (Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in
    the Machine Learning Model Supply Chain", 2017).

    ``conv 16@5x5 -> ReLU -> maxpool 2 -> conv 32@5x5 -> ReLU -> maxpool 2 -> fc 512 -> ReLU -> fc K``
    with unpadded convolutions and no batch norm. The flatten size follows ``input_size``
    (28 -> 32*4*4, 32 -> 32*5*5); inputs of another size are rejected with a clear error.

    Args:
        num_classes: number of classes (>= 2).
        in_channels: input channels (1 for MNIST).
        mean, std: statistics of the built-in ``Normalize`` (None: identity).
        input_size: input height/width (int or ``(h, w)``), at least 16.
        hidden: width of the hidden fully connected layer.

    Example:
        >>> BadNetsCNN(in_channels=1)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | float | Tensor | None = None,
        std: Sequence[float] | float | Tensor | None = None,
        input_size: int | Sequence[int] = 28,
        hidden: int = 512,
    ) -> None:
        super().__init__(num_classes, in_channels, mean, std)
        h, w = _input_hw(input_size)
        hidden = check_int_at_least(hidden, "hidden", 1)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ValueError(f"input_size must be at least 16x16 for the BadNets CNN, got {(h, w)}")
        self.input_size = (h, w)
        self.conv1 = nn.Conv2d(self.in_channels, 16, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * fh * fw, hidden)
        self.relu3 = nn.ReLU()
        self.num_features = hidden
        self.fc = nn.Linear(hidden, self.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.preprocess(x)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.relu3(self.fc1(torch.flatten(x, 1)))


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


@MODELS.register("small_cnn")
class SmallCNN(ImageClassifier):
    """A small Conv-BN-ReLU network for fast experiments and tests (no paper; a generic baseline).

    Three stages of two 3x3 Conv-BN-ReLU layers with ``width * (1, 2, 4)`` channels, 2x2 max
    pooling between stages, global average pooling and a linear head. Any input of at least 4x4
    works (8x8 and up recommended).

    Args:
        num_classes: number of classes (>= 2).
        in_channels: input channels.
        mean, std: statistics of the built-in ``Normalize`` (None: identity).
        width: channels of the first stage (32 gives 32-64-128).

    Example:
        >>> SmallCNN(width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | float | Tensor | None = None,
        std: Sequence[float] | float | Tensor | None = None,
        width: int = 32,
    ) -> None:
        super().__init__(num_classes, in_channels, mean, std)
        width = check_int_at_least(width, "width", 1)
        self.width = width
        w1, w2, w3 = width, 2 * width, 4 * width
        self.stage1 = nn.Sequential(_conv_bn_relu(self.in_channels, w1), _conv_bn_relu(w1, w1))
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(_conv_bn_relu(w1, w2), _conv_bn_relu(w2, w2))
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = nn.Sequential(_conv_bn_relu(w2, w3), _conv_bn_relu(w3, w3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = w3
        self.fc = nn.Linear(w3, self.num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.preprocess(x)
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        x = self.stage3(x)
        return torch.flatten(self.avgpool(x), 1)

