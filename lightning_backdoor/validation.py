"""Argument and input checks shared by every layer (public: components outside the package use them too).

Each ``check_*`` returns the checked value (converted where said) or raises ``TypeError`` (wrong
kind of value) / ``ValueError`` (right kind, wrong value) with a message that names the argument,
the value seen and what would be accepted, so that bad input never reaches a crash deep inside
torch. All of them are torch-only and never import Lightning.

Example:
    >>> from lightning_backdoor.validation import check_positive_int, check_probability
    >>> check_positive_int(3, "n")
    3
    >>> check_probability(1.5, "rate")
    Traceback (most recent call last):
    ...
    ValueError: rate must be in [0, 1], got 1.5
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "PIXEL_TOL",
    "check_above_one",
    "check_bool",
    "check_choice",
    "check_images",
    "check_int",
    "check_label",
    "check_non_negative_float",
    "check_optional_positive_int",
    "check_optional_real",
    "check_positive_float",
    "check_positive_int",
    "check_probability",
    "check_real",
    "check_seed",
    "check_size2",
    "warn_ignored",
]

# Tolerance for pixel values slightly outside [0, 1] from float round-off (e.g. after Normalize^-1).
PIXEL_TOL = 1e-4


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_images(x: Any, name: str = "x", *, allow_single: bool = True) -> Tensor:
    """Check that ``x`` is a float image tensor in pixel space ``[0, 1]``.

    Accepts ``[N, C, H, W]`` (and ``[C, H, W]`` when ``allow_single``). Rejects integer dtypes
    (e.g. uint8 0-255 images), NaN/Inf, and values outside ``[0, 1]`` (a normalised batch where
    pixel space is expected is the usual cause).
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
        hint = " (a normalised batch? pass images in [0, 1] and put Normalize inside the model)" if lo < 0 else ""
        raise ValueError(
            f"{name} must be in pixel space [0, 1] (normalisation belongs inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]{hint}"
        )
    return x


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value: Any, name: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An ``int`` (not a bool) in ``[low, high]`` (either end optional)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
        raise ValueError(f"{name} must be {'>= ' + str(low) if low is not None else '<= ' + str(high)}, got {value}")
    return int(value)


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    """An ``int`` ``>= 1`` (``>= 0`` with ``allow_zero``)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")
    return int(value)


def check_optional_positive_int(value: Any, name: str) -> Optional[int]:
    """None, or an ``int >= 1``."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return int(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an ``int >= 0``."""
    return check_positive_int(value, name, allow_zero=True)


def check_real(value: Any, name: str) -> float:
    """A finite real number (int or float, not bool)."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_optional_real(value: Any, name: str) -> Optional[float]:
    """None, or a finite real number."""
    if value is None:
        return None
    if not _is_real(value) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number or None, got {value!r}")
    return float(value)


def check_positive_float(value: Any, name: str) -> float:
    """A finite real number ``> 0``."""
    v = check_real(value, name)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return v


def check_above_one(value: Any, name: str, why: str = "") -> float:
    """A finite real number ``> 1`` (an amplification factor); ``why`` says what a factor ``<= 1`` would do."""
    v = check_real(value, name)
    if v <= 1:
        raise ValueError(f"{name} must be > 1, got {value}" + (f" ({why})" if why else ""))
    return v


def check_non_negative_float(value: Any, name: str) -> float:
    """A finite real number ``>= 0``."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def check_probability(value: Any, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    """A real number in ``[0, 1]`` (ends open as requested)."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def check_label(value: Any, name: str, num_classes: int) -> int:
    """A class index in ``[0, num_classes - 1]``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int class index, got {value!r}")
    if not 0 <= value < num_classes:
        raise ValueError(f"{name} must be a class index in [0, {num_classes - 1}], got {value}")
    return int(value)


def warn_ignored(owner: str, name: str, value: Any, why: str, *, stacklevel: int = 3) -> None:
    """Warn that argument ``name=value`` of ``owner`` has no effect (``why``: when it would, or what to do)."""
    warnings.warn(f"{owner}: {name}={value!r} is ignored: {why}", UserWarning, stacklevel=stacklevel)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_size2(value: Any, name: str) -> Tuple[int, int]:
    """An ``int`` or a ``(height, width)`` pair of ints, each ``>= 1``; returned as a pair."""
    if _is_int(value):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if value[0] < 1 or value[1] < 1:
        raise ValueError(f"{name} must be >= 1, got {tuple(value)}")
    return int(value[0]), int(value[1])
