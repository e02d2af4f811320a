"""BadNets: a small patch stamped at a fixed place."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..validation import check_seed, check_size2
from . import functional as AF
from .base import ATTACKS, Attack, _check_image_shape, _check_trigger_tensor


def _check_location(location: Any) -> Union[str, Tuple[int, int]]:
    if isinstance(location, str):
        if location not in AF.LOCATIONS:
            raise ValueError(f"location must be one of {list(AF.LOCATIONS)} or a (row, col) pair, got {location!r}")
        return location
    if (
        isinstance(location, (tuple, list))
        and len(location) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in location)
    ):
        if location[0] < 0 or location[1] < 0:
            raise ValueError(f"location (row, col) must be non-negative, got {tuple(location)}")
        return int(location[0]), int(location[1])
    raise TypeError(f"location must be one of {list(AF.LOCATIONS)} or a (row, col) pair of ints, got {location!r}")


@ATTACKS.register("badnets")
class BadNets(Attack):
    """BadNets patch trigger: ``x' = (1 - m) * x + m * p`` on a ``p x q`` region.

    Paper: Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
    Model Supply Chain" (2017). Threat model: dirty-label data poisoning — the attacker stamps a
    fixed visible patch on a share of the training images and relabels them to the target class.

    The default trigger is a ``patch_size x patch_size`` uniform-noise patch drawn from ``seed``
    with a local generator (the global RNG is not consumed), with as many channels as the images;
    it is created by ``build(channels, height, width)`` or on first use and kept as the ``patch``
    buffer, so it is saved in ``state_dict()`` and restored by ``load_state_dict()`` — also into a
    fresh instance that has not seen an image yet. (An all-white patch is a known weak case for
    SCALE-UP, hence noise by default.)

    Args:
        patch_size: side of the seeded noise patch, an int or ``(height, width)``; ignored when
            ``patch`` is given (its own size is used).
        location: ``"bottom_right"`` (default), ``"top_left"``, ``"top_right"``, ``"bottom_left"``
            or the ``(row, col)`` of the patch's top-left corner.
        patch: optional user patch, ``[C, p, q]`` or ``[p, q]`` (broadcast over channels), in ``[0, 1]``.
        mask: optional blending mask ``[p, q]``, ``[1, p, q]`` or ``[C, p, q]`` in ``[0, 1]``;
            default all ones (the patch replaces the pixels).
        seed: seed of the noise patch.

    Example:
        >>> import torch
        >>> attack = BadNets(patch_size=3, seed=0)
        >>> x = torch.rand(8, 3, 32, 32)
        >>> xp = attack(x)
        >>> bool((xp[:, :, -3:, -3:] == attack.patch).all()), bool((xp[:, :, :29] == x[:, :, :29]).all())
        (True, True)
    """

    name = "badnets"
    _lazy_buffers = ("patch", "mask")
    patch: Tensor | None
    mask: Tensor | None

    def __init__(
        self,
        patch_size: int | Sequence[int] = 3,
        location: str | Sequence[int] = "bottom_right",
        patch: Tensor | None = None,
        mask: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = check_seed(seed)
        self.location = _check_location(location)
        self.user_patch = patch is not None
        if patch is None:
            self.patch_size = check_size2(patch_size, "patch_size")
        else:
            patch = _check_trigger_tensor(patch, "patch")
            self.patch_size = (int(patch.shape[-2]), int(patch.shape[-1]))
        if mask is not None:
            mask = _check_trigger_tensor(mask, "mask")
            if float(mask.max()) == 0:
                raise ValueError("mask is all zeros, so the patch would change no pixel (the trigger would be the "
                                 "identity); use a mask with values in (0, 1] where the patch goes, or mask=None")
            if tuple(mask.shape[-2:]) != self.patch_size:
                raise ValueError(
                    f"mask of shape {tuple(mask.shape)} does not match the patch size {self.patch_size}; "
                    f"expected [{self.patch_size[0]}, {self.patch_size[1]}] or [C, ...] of that size"
                )
            if patch is not None and mask.shape[0] != 1 and patch.shape[0] not in (1, mask.shape[0]):
                raise ValueError(
                    f"mask has {mask.shape[0]} channels but patch has {patch.shape[0]}; use 1 or {patch.shape[0]}"
                )
        self.register_buffer("patch", patch)
        self.register_buffer("mask", mask)

    # -- trigger state ---------------------------------------------------------------------------
    def build(self, channels: int, height: int, width: int) -> "BadNets":
        """Create the noise patch (if not yet) and check the trigger fits ``channels x height x width`` images."""
        self._check_shape(channels, height, width)
        return self

    def _check_shape(self, channels: int, height: int, width: int, device: torch.device | None = None) -> Tuple[int, int]:
        _check_image_shape(channels, height, width)
        size = tuple(self.patch.shape[-2:]) if self.patch is not None else self.patch_size
        row_col = AF.resolve_location(self.location, size, (height, width))
        if self.patch is None:
            self.patch = AF.seeded_rand((channels, *self.patch_size), self.seed).to(device or "cpu")
        for name, t in (("patch", self.patch), ("mask", self.mask)):
            if t is not None and t.shape[0] not in (1, channels):
                raise ValueError(
                    f"{name} has {t.shape[0]} channels but the images have {channels}; "
                    f"use a 1-channel (broadcast) or {channels}-channel {name}"
                )
        return row_col

    # -- trigger ---------------------------------------------------------------------------------
    def apply_trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        row_col = self._check_shape(c, h, w, device=x.device)
        return AF.stamp_patch(x, self.patch, self.mask, location=row_col).clamp(0, 1)

    def hparams(self) -> Dict[str, Any]:
        p, q = self.patch_size
        return {
            "patch_size": p if p == q else [p, q],
            "location": self.location if isinstance(self.location, str) else list(self.location),
            "patch": {"shape": list(self.patch.shape)} if self.user_patch and self.patch is not None else None,
            "mask": {"shape": list(self.mask.shape)} if self.mask is not None else None,
            "seed": self.seed,
        }
