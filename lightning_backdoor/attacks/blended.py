"""Blended: a whole-image pattern blended into the input."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from ..validation import check_probability, check_seed
from . import functional as AF
from .base import ATTACKS, Attack, _check_image_shape, _check_trigger_tensor


@ATTACKS.register("blended")
class Blended(Attack):
    """Blended trigger: ``x' = (1 - alpha) * x + alpha * p`` over the whole image.

    Paper: Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using
    Data Poisoning" (2017). Threat model: dirty-label data poisoning with a faint, image-wide
    trigger pattern; poisoned training images are relabelled to the target class.

    ``pattern`` may be any image (resized bilinearly to the input size when it differs; a
    1-channel pattern is broadcast over channels). With ``pattern=None`` the trigger is uniform
    noise drawn from ``seed`` with a local generator at the image shape ``[C, H, W]``, created by
    ``build(channels, height, width)`` or on first use and kept as the ``pattern`` buffer (saved in
    ``state_dict()``, restored by ``load_state_dict()`` into a fresh instance). A noise pattern is
    tied to the shape it was built for; use a new instance for another image size.

    Args:
        alpha: blend weight in ``(0, 1]`` (0.2 in the paper's noise experiments; 0 would be no trigger).
        pattern: optional ``[C, H, W]`` or ``[H, W]`` pattern in ``[0, 1]``.
        seed: seed of the noise pattern.

    Example:
        >>> import torch
        >>> attack = Blended(alpha=0.2, seed=0)
        >>> x = torch.rand(4, 3, 32, 32)
        >>> xp = attack(x)
        >>> torch.allclose(xp, 0.8 * x + 0.2 * attack.pattern)
        True
    """

    name = "blended"
    _lazy_buffers = ("pattern",)
    pattern: Tensor | None

    def __init__(self, alpha: float = 0.2, pattern: Tensor | None = None, seed: int = 0) -> None:
        super().__init__()
        self.alpha = check_probability(alpha, "alpha", low_open=True)
        self.seed = check_seed(seed)
        self.user_pattern = pattern is not None
        if pattern is not None:
            pattern = _check_trigger_tensor(pattern, "pattern")
        self.register_buffer("pattern", pattern)

    def build(self, channels: int, height: int, width: int) -> "Blended":
        """Create the noise pattern (if not yet) and check the pattern fits ``channels x height x width`` images."""
        self._check_shape(channels, height, width)
        return self

    def _check_shape(self, channels: int, height: int, width: int, device: torch.device | None = None) -> None:
        _check_image_shape(channels, height, width)
        if self.pattern is None:
            self.pattern = AF.seeded_rand((channels, height, width), self.seed).to(device or "cpu")
        pc, ph, pw = self.pattern.shape
        if pc not in (1, channels):
            raise ValueError(
                f"pattern has {pc} channels but the images have {channels}; "
                f"use a 1-channel (broadcast) or {channels}-channel pattern"
            )
        if not self.user_pattern and (ph, pw) != (height, width):
            raise ValueError(
                f"the seeded noise pattern was built for {ph}x{pw} images, got {height}x{width} images; "
                "create a new Blended instance for another image size"
            )

    def apply_trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        self._check_shape(c, h, w, device=x.device)
        pattern = AF.resize_pattern(self.pattern.to(device=x.device, dtype=x.dtype), h, w)
        return AF.blend(x, pattern, self.alpha)

    def hparams(self) -> Dict[str, Any]:
        return {
            "alpha": self.alpha,
            "pattern": {"shape": list(self.pattern.shape)} if self.user_pattern and self.pattern is not None else None,
            "seed": self.seed,
        }
