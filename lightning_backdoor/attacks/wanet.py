"""WaNet: a smooth, nearly invisible warp as the trigger."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from ..validation import check_images, check_non_negative_float, check_positive_float, check_positive_int, check_seed
from . import functional as AF
from .base import ATTACKS, Attack, _check_image_shape


@ATTACKS.register("wanet")
class WaNet(Attack):
    """WaNet warping trigger: ``x' = grid_sample(x, identity + s * upsample(noise_k))``.

    Paper: Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack" (ICLR 2021).
    Threat model: dirty-label data poisoning with an imperceptible geometric trigger; poisoned
    images are relabelled to the target. In the paper's "noise mode", a further ``cross_ratio``
    times the poison rate of the training samples is warped with the trigger field *plus* a random
    per-sample perturbation and keeps its true label (``cover``), so that the model learns the
    exact field rather than "any warp". The data pipeline reads that share from ``cover_ratio``.

    The ``[2, k, k]`` control field is drawn at construction from ``seed`` with a local generator
    (independent of the image size; the global RNG is not consumed) and stored as the ``noise``
    buffer. It is upsampled (bicubic) to any ``H x W``, square or not, and any channel count.
    The displacement is ``s / W`` (x) and ``s / H`` (y) times the normalised field, in
    ``grid_sample(align_corners=True)`` coordinates, as in the published implementation.

    Args:
        k: control grid size, ``2 <= k <= min(H, W)`` (paper: 4).
        s: warping strength, ``> 0`` (paper: 0.5; ``s = 0`` would be the identity, no trigger).
        grid_rescale: factor applied to the grid before clamping to ``[-1, 1]`` (paper: 1).
        cross_ratio: noise-mode samples per poisoned sample (paper: 2); sets ``cover_ratio``.
        seed: seed of the control field.

    Example:
        >>> import torch
        >>> attack = WaNet(k=4, s=0.5, seed=0)
        >>> x = torch.rand(4, 3, 32, 32)
        >>> xp = attack(x)
        >>> xc = attack.cover(x, generator=torch.Generator().manual_seed(1))
        >>> xp.shape == xc.shape == x.shape
        True
    """

    name = "wanet"
    noise: Tensor

    def __init__(
        self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0, seed: int = 0
    ) -> None:
        super().__init__()
        self.k = check_positive_int(k, "k")
        self.s = check_positive_float(s, "s")  # s = 0 would make the trigger the identity warp
        self.grid_rescale = check_positive_float(grid_rescale, "grid_rescale")
        self.cross_ratio = check_non_negative_float(cross_ratio, "cross_ratio")
        self.cover_ratio = self.cross_ratio
        self.seed = check_seed(seed)
        self.register_buffer("noise", AF.wanet_noise(self.k, generator=AF.seeded_generator(self.seed)))

    def build(self, channels: int, height: int, width: int) -> "WaNet":
        """Check the control grid fits ``height x width`` images (``k <= min(H, W)``)."""
        _check_image_shape(channels, height, width)
        if self.k > min(height, width):
            raise ValueError(
                f"k={self.k} is larger than the image size {height}x{width}; k must be <= {min(height, width)}"
            )
        return self

    def grid(self, height: int, width: int, device: torch.device | None = None) -> Tensor:
        """The ``[1, height, width, 2]`` trigger sampling grid on ``device`` (default: the buffer's)."""
        device = self.noise.device if device is None else torch.device(device)
        # The grid depends only on the noise field, s, the size and the device: cache it, keyed so that a
        # load_state_dict (new tensor or in-place change bumps _version) or a new s invalidates it.
        key = (height, width, str(device), self.noise.data_ptr(), self.noise._version, self.s, self.grid_rescale)
        cache = self.__dict__.setdefault("_grid_cache", {})
        if key not in cache:
            cache.clear()
            with torch.inference_mode(False):  # a normal tensor, usable later under autograd
                cache[key] = AF.wanet_grid(self.noise.to(device), height, width, self.s, self.grid_rescale)
        return cache[key]

    def apply_trigger(self, x: Tensor) -> Tensor:
        _, c, h, w = x.shape
        self.build(c, h, w)
        return AF.warp(x, self.grid(h, w, x.device))

    def cover(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise-mode warp: the trigger grid plus a per-sample ``U[-1, 1] / size`` perturbation.

        Args:
            x: images ``[N, C, H, W]`` or ``[C, H, W]`` in ``[0, 1]``.
            generator: random source of the perturbation (any device); ``None`` uses the global RNG.
        """
        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        n, c, h, w = xb.shape
        self.build(c, h, w)
        grids = AF.wanet_noise_grid(self.grid(h, w, x.device), n, generator=generator)
        out = AF.warp(xb, grids)
        return out[0] if single else out

    def hparams(self) -> Dict[str, Any]:
        return {
            "k": self.k,
            "s": self.s,
            "grid_rescale": self.grid_rescale,
            "cross_ratio": self.cross_ratio,
            "seed": self.seed,
        }
