"""VGG with batch norm (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015; BN after Ioffe & Szegedy, 2015) with a CIFAR-style classifier."""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import Tensor, nn

from ._base import ImageClassifier, check_int_at_least, init_weights
from ._factory import MODELS

_Stat = Sequence[float] | float | Tensor | None

# Conv widths per layer, "M" = 2x2 max pool (configurations A/B/D/E of the paper).
VGG_CONFIGS: Dict[int, List[Union[int, str]]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(ImageClassifier):
    """VGG-11/13/16/19 with BN for small images (Simonyan & Zisserman, ICLR 2015).

    ``features`` is the stack of 3x3 Conv-BN-ReLU layers with five 2x2 max pools. The pools use
    ``ceil_mode=True``, so odd sizes round up and a 1x1 map stays 1x1: 32x32 behaves exactly as the
    usual CIFAR VGG (1x1 after the last pool), 28x28 and any other size >= 1 work too. Then
    adaptive average pooling to 1x1 and the CIFAR-style classifier: a single ``Linear(512, K)``,
    or with ``hidden_dim > 0`` two hidden ``Linear-ReLU-Dropout`` layers before it.

    Args:
        depth: 11, 13, 16 or 19.
        num_classes: number of classes (>= 2).
        in_channels: input channels.
        mean, std: statistics of the built-in ``Normalize`` (None: identity).
        width_div: divide every conv width by this (e.g. 8 gives 8..64 channels) for cheap tests.
        hidden_dim: width of the two hidden classifier layers (0: single linear layer).
        dropout: dropout probability of the hidden classifier layers.

    Example:
        >>> VGG(16, width_div=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: _Stat = None,
        std: _Stat = None,
        width_div: int = 1,
        hidden_dim: int = 0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(num_classes, in_channels, mean, std)
        if depth not in VGG_CONFIGS or isinstance(depth, bool):
            raise ValueError(f"depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
        self.depth = depth
        self.width_div = check_int_at_least(width_div, "width_div", 1)
        self.hidden_dim = check_int_at_least(hidden_dim, "hidden_dim", 0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")

        layers: List[nn.Module] = []
        c_in = self.in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                c_out = max(1, int(v) // self.width_div)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if self.hidden_dim:
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(c_in, self.hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                nn.Linear(self.hidden_dim, self.hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            )
            self.num_features = self.hidden_dim
        else:
            self.classifier = nn.Identity()
            self.num_features = c_in
        self.fc = nn.Linear(self.num_features, self.num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.features(self.preprocess(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@MODELS.register("vgg11_bn")
def vgg11_bn(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: _Stat = None,
    std: _Stat = None,
    width_div: int = 1,
    hidden_dim: int = 0,
    dropout: float = 0.5,
) -> VGG:
    """VGG-11 with batch norm (8 Conv-BN-ReLU layers, configuration A), CIFAR-style classifier.

    Example:
        >>> vgg11_bn(width_div=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG(11, num_classes, in_channels, mean, std, width_div=width_div, hidden_dim=hidden_dim, dropout=dropout)


@MODELS.register("vgg16_bn")
def vgg16_bn(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: _Stat = None,
    std: _Stat = None,
    width_div: int = 1,
    hidden_dim: int = 0,
    dropout: float = 0.5,
) -> VGG:
    """VGG-16 with batch norm (13 Conv-BN-ReLU layers), CIFAR-style classifier.

    Example:
        >>> vgg16_bn(width_div=8)(torch.rand(2, 3, 28, 28)).shape
        torch.Size([2, 10])
    """
    return VGG(16, num_classes, in_channels, mean, std, width_div=width_div, hidden_dim=hidden_dim, dropout=dropout)


@MODELS.register("vgg19_bn")
def vgg19_bn(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: _Stat = None,
    std: _Stat = None,
    width_div: int = 1,
    hidden_dim: int = 0,
    dropout: float = 0.5,
) -> VGG:
    """VGG-19 with batch norm (16 Conv-BN-ReLU layers), CIFAR-style classifier.

    Example:
        >>> vgg19_bn(width_div=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG(19, num_classes, in_channels, mean, std, width_div=width_div, hidden_dim=hidden_dim, dropout=dropout)
