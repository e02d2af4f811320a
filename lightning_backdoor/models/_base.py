"""Shared base of the package's image classifiers: argument checks and the built-in ``Normalize``."""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch
from torch import Tensor, nn

from .normalize import Normalize, _as_floats


def check_num_classes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"num_classes must be an int >= 2, got {type(value).__name__}: {value!r}")
    if value < 2:
        raise ValueError(f"num_classes must be an int >= 2 (a classifier needs two classes), got {value}")
    return value


def check_int_at_least(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}: {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return value


def build_normalize(
    mean: Sequence[float] | float | Tensor | None,
    std: Sequence[float] | float | Tensor | None,
    in_channels: int,
) -> Normalize:
    """A ``Normalize`` with exactly ``in_channels`` entries (identity when both are None).

    Single values broadcast to every channel, so checkpoints of the same architecture always
    have the same buffer shapes whatever statistics they were built with.
    """
    if mean is None and std is None:
        return Normalize.identity(in_channels)
    if mean is None or std is None:
        missing = "mean" if mean is None else "std"
        raise ValueError(f"mean and std must be given together (or both None for no normalisation); {missing} is None")
    m, s = _as_floats(mean, "mean"), _as_floats(std, "std")
    for name, vals in (("mean", m), ("std", s)):
        if len(vals) not in (1, in_channels):
            raise ValueError(
                f"{name} must have 1 or in_channels={in_channels} values, got {len(vals)}: {vals}"
            )
    m = m * in_channels if len(m) == 1 else m
    s = s * in_channels if len(s) == 1 else s
    return Normalize(m, s)


def check_model_input(x: Tensor, in_channels: int, input_size: Tuple[int, int] | None) -> Tensor:
    """Reject input of the wrong rank, channel count or (when fixed) spatial size.

    Without this, a 1-channel batch fed to a 3-channel model would be silently broadcast to three
    channels by ``Normalize``. Registered with ``torch.fx.wrap`` so tracing records it as one call.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be an image batch of shape [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but the model was built with in_channels={in_channels} "
            f"(x shape {tuple(x.shape)})"
        )
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        raise ValueError(
            f"x has spatial size {tuple(x.shape[-2:])} but the model was built for input_size={tuple(input_size)}"
        )
    return x


torch.fx.wrap("check_model_input")


class ImageClassifier(nn.Module):
    """Base class: validates ``num_classes``/``in_channels`` and owns ``self.normalize``.

    Subclasses build their layers, set ``self.fc`` (the final ``nn.Linear``) and
    ``self.num_features`` (its input width), and implement ``forward_features``: pixels in
    ``[0, 1]`` -> ``self.preprocess`` (input check + ``self.normalize``) -> body -> penultimate features ``[N, num_features]``.
    ``forward`` is ``fc(forward_features(x))``.

    Example:
        >>> isinstance(create_model("small_cnn"), ImageClassifier)  # doctest: +SKIP
        True
    """

    fc: nn.Linear
    num_features: int
    input_size: Tuple[int, int] | None = None  # set by models whose layers fix the input size

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | float | Tensor | None = None,
        std: Sequence[float] | float | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.in_channels = check_int_at_least(in_channels, "in_channels", 1)
        self.normalize = build_normalize(mean, std, self.in_channels)

    def preprocess(self, x: Tensor) -> Tensor:
        """Check the input batch and apply ``self.normalize``; the first step of ``forward_features``."""
        # check_model_input must be called from this module for torch.fx.wrap to apply.
        return self.normalize(check_model_input(x, self.in_channels, self.input_size))

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit-scale/zero-shift batch norm (He et al., 2015)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
