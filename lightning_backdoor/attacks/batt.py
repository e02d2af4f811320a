"""BATT: a spatial transformation (rotation or translation) as the trigger."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ..validation import check_choice, check_probability, check_real, check_seed
from . import functional as AF
from .base import ATTACKS, Attack, _check_image_shape


def _check_shift(shift: Any) -> Tuple[int, int]:
    if not isinstance(shift, (tuple, list)) or len(shift) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in shift):
        raise TypeError(f"shift must be a (dx, dy) pair of ints (pixels right, down), got {shift!r}")
    if tuple(shift) == (0, 0):
        raise ValueError("shift=(0, 0) would make the trigger the identity; use a non-zero (dx, dy) in pixels")
    return int(shift[0]), int(shift[1])


@ATTACKS.register("batt")
class BATT(Attack):
    """BATT: the trigger is a fixed spatial transformation of the whole image.

    Paper: Xu, Li, Jiang & Xia, "BATT: Backdoor Attack with Transformation-based Triggers"
    (ICASSP 2023). Threat model: dirty-label, all-to-one data poisoning; poisoned training images
    are rotated by ``angle`` (default 16°) or shifted by ``shift`` pixels and relabelled to the target.

    Trigger (``transform="rotate"``): ``x' = rotate(x, angle)``, counter-clockwise about the
    centre, bilinear, zero fill — ``torchvision.transforms.v2.functional.rotate(x, angle, BILINEAR)``.
    ``transform="translate"``: ``x'`` is ``x`` moved ``dx`` pixels right and ``dy`` down, zero fill.

    Clean images (``clean_train_transform``): a share ``clean_p`` of the clean training images is
    rotated by ``U[-clean_strength * angle, clean_strength * angle]`` (or shifted by integer
    offsets up to ``clean_strength * |dx|``, ``* |dy|``), so that "rotated" is not the shortcut —
    only the trigger's exact transformation is. ``clean_strength < 1`` keeps the trigger's value
    outside the clean range. With the data module's augmentation, note that a horizontal flip
    turns a +16° rotation into -16°, and a random crop moves a translation trigger.

    The trigger has no random state; ``seed`` seeds the clean-image draws made without a
    ``generator`` (the data pipeline passes one per sample, seeded from its index).

    Args:
        transform: ``"rotate"`` (default) or ``"translate"``.
        angle: rotation in degrees, ``0 < |angle| < 360`` (default 16).
        shift: ``(dx, dy)`` pixels for ``"translate"``, not ``(0, 0)`` (default ``(3, 3)``).
        clean_strength: clean jitter relative to the trigger, ``[0, 1)`` (default 0.25, i.e. ±4° for the 16° trigger; 0: none).
        clean_p: share of clean training images jittered, ``[0, 1]`` (default 0.5).
        seed: seed of clean-image draws without a generator.

    Example:
        >>> import torch
        >>> from torchvision.transforms import InterpolationMode
        >>> from torchvision.transforms.v2 import functional as TF
        >>> a = BATT(angle=16.0)
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.allclose(a(x), TF.rotate(x, 16.0, InterpolationMode.BILINEAR), atol=1e-5)
        True
    """

    name = "batt"
    sample_seeded = True

    def __init__(
        self,
        transform: str = "rotate",
        angle: float = 16.0,
        shift: Sequence[int] = (3, 3),
        clean_strength: float = 0.25,
        clean_p: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.transform = check_choice(transform, "transform", ("rotate", "translate"))
        self.angle = check_real(angle, "angle")
        if self.transform == "rotate" and math.remainder(self.angle, 360.0) == 0:
            raise ValueError(f"angle={angle} is a whole turn, so the rotation trigger would be the identity; "
                             "use an angle with 0 < |angle| < 360 (the paper: 16)")
        if abs(self.angle) >= 360:
            raise ValueError(f"angle must satisfy 0 < |angle| < 360 degrees, got {angle}")
        self.shift = _check_shift(shift)
        self.clean_strength = check_probability(clean_strength, "clean_strength", high_open=True)
        self.clean_p = check_probability(clean_p, "clean_p")
        self.seed = check_seed(seed)
        self._draws = 0  # clean-image draws made without a generator (each seeded from (seed, count))

    def build(self, channels: int, height: int, width: int) -> "BATT":
        """Check the translation fits ``height x width`` images (a shift of the whole width leaves nothing)."""
        _check_image_shape(channels, height, width)
        if self.transform == "translate":
            dx, dy = self.shift
            if abs(dx) >= width or abs(dy) >= height:
                raise ValueError(f"shift={self.shift} moves the whole {height}x{width} image out of the frame; "
                                 f"use |dx| < {width} and |dy| < {height}")
        return self

    def apply_trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        self.build(c, h, w)
        if self.transform == "rotate":
            return AF.rotate(x, self.angle)
        return AF.translate(x, *self.shift)

    def apply_clean_train_transform(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.clean_strength == 0 or self.clean_p == 0:
            return x
        gen = generator
        if gen is None:
            gen = AF.seeded_generator((self.seed * 1_000_003 + self._draws) % (2**63 - 1))
            self._draws += 1
        n = x.shape[0]
        u = torch.rand((n, 3), generator=gen, device=gen.device, dtype=torch.float64).cpu()
        apply = u[:, 0] < self.clean_p
        if not bool(apply.any()):
            return x
        if self.transform == "rotate":
            angles = (u[:, 1] * 2 - 1) * self.clean_strength * self.angle
            out = AF.rotate(x, angles.to(x.device))
            return torch.where(apply.to(x.device).view(n, 1, 1, 1), out, x)
        out = x.clone()
        limits = [int(self.clean_strength * abs(v)) for v in self.shift]
        for i in torch.nonzero(apply).flatten().tolist():
            dx, dy = (int(round(float((u[i, j + 1] * 2 - 1) * lim))) for j, lim in enumerate(limits))
            out[i : i + 1] = AF.translate(x[i : i + 1], dx, dy)
        return out

    def hparams(self) -> Dict[str, Any]:
        return {
            "transform": self.transform,
            "angle": self.angle,
            "shift": list(self.shift),
            "clean_strength": self.clean_strength,
            "clean_p": self.clean_p,
            "seed": self.seed,
        }
