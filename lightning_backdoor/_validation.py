"""Argument and input checks shared by every layer.

Each check raises ``ValueError``/``TypeError`` naming the argument, the value seen and what would
be accepted, so that bad input never reaches a crash deep inside torch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

# Tolerance for pixel values slightly outside [0, 1] from float round-off (e.g. after Normalize^-1).
PIXEL_TOL = 1e-4


def check_images(x: Any, name: str = "x", *, allow_single: bool = True) -> Tensor:
    """Check that ``x`` is a float image tensor in pixel space ``[0, 1]``.

    Accepts ``[N, C, H, W]`` (and ``[C, H, W]`` when ``allow_single``). Rejects integer dtypes
    (e.g. uint8 0-255 images), NaN/Inf, and values outside ``[0, 1]``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images in [0, 1], got {type(x).__name__}")
    ndims = (3, 4) if allow_single else (4,)
    if x.dim() not in ndims:
        shapes = "[N, C, H, W] or [C, H, W]" if allow_single else "[N, C, H, W]"
        raise ValueError(f"{name} must have shape {shapes}, got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        hint = " (uint8 images in 0-255? divide by 255 first)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}{hint}")
    if x.numel() == 0:
        return x
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values; images must be finite and in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -PIXEL_TOL or hi > 1 + PIXEL_TOL:
        raise ValueError(
            f"{name} must be in pixel space [0, 1] (normalisation belongs inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )
    return x


def check_probability(value: Any, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """Check ``value`` is a real number in ``[0, 1]`` (ends open as requested)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return value


def check_positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_label(value: Any, name: str, num_classes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int class index, got {value!r}")
    if not 0 <= value < num_classes:
        raise ValueError(f"{name} must be a class index in [0, {num_classes - 1}], got {value}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
