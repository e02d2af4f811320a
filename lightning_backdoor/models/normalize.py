"""Per-channel input normalisation that lives inside the model, and the datasets' usual statistics.

Attacks and detectors work on pixels in ``[0, 1]``; every model in this package starts with a
:class:`Normalize` module, so a trigger or a detector never has to know the dataset's statistics.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

# Per-channel mean/std of the training sets in pixel space [0, 1].
# CIFAR-10 std is the per-pixel std over the training set (0.247, 0.243, 0.261), not the widely
# copied (0.2023, 0.1994, 0.2010), which is a mean of per-image stds.
DATASET_STATS: Dict[str, Dict[str, Tuple[float, ...]]] = {
    "mnist": {"mean": (0.1307,), "std": (0.3081,)},
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "gtsrb": {"mean": (0.3403, 0.3121, 0.3214), "std": (0.2724, 0.2608, 0.2669)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}
# ImageNet subsets use the ImageNet statistics.
DATASET_STATS["imagenette"] = DATASET_STATS["imagenet"]
DATASET_STATS["tiny_imagenet"] = DATASET_STATS["imagenet"]


def _as_floats(value: Any, name: str) -> Tuple[float, ...]:
    if isinstance(value, Tensor):
        value = value.detach().flatten().tolist()
    elif isinstance(value, Real) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a sequence of per-channel floats (e.g. DATASET_STATS['cifar10']['{name}']), "
            f"got {type(value).__name__}: {value!r}"
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
            raise TypeError(f"{name} must contain finite real numbers, got {value!r}")
        out.append(float(v))
    if not out:
        raise ValueError(f"{name} must have at least one value (one per channel), got {value!r}")
    return tuple(out)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, with ``mean``/``std`` stored as (persistent) buffers.

    Works for any channel count; a single value broadcasts over all channels. Accepts
    ``[N, C, H, W]`` or ``[C, H, W]`` input and follows the module's device and dtype.

    Args:
        mean: per-channel means (sequence, tensor or a single float).
        std: per-channel standard deviations, all > 0, same length as ``mean``.

    Example:
        >>> norm = Normalize(**DATASET_STATS["cifar10"]); norm(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | float | Tensor, std: Sequence[float] | float | Tensor) -> None:
        super().__init__()
        m, s = _as_floats(mean, "mean"), _as_floats(std, "std")
        if len(m) != len(s):
            raise ValueError(
                f"mean and std must have the same length (one value per channel), "
                f"got len(mean)={len(m)} and len(std)={len(s)}"
            )
        if any(v <= 0 for v in s):
            raise ValueError(f"std must be > 0 for every channel, got {s}")
        self.register_buffer("mean", torch.tensor(m, dtype=torch.get_default_dtype()).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.get_default_dtype()).view(-1, 1, 1))

    @classmethod
    def identity(cls, channels: int = 1) -> "Normalize":
        """A no-op normalisation (mean 0, std 1) over ``channels`` channels.

        Example:
            >>> Normalize.identity(3)(torch.ones(1, 3, 2, 2)).sum().item()
            12.0
        """
        return cls([0.0] * channels, [1.0] * channels)

    @property
    def num_channels(self) -> int:
        return self.mean.numel()

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: Tensor) -> Tensor:
        """Map normalised values back to pixel space: ``x * std + mean``."""
        return x * self.std + self.mean

    def extra_repr(self) -> str:
        fmt = lambda t: "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"  # noqa: E731
        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"
