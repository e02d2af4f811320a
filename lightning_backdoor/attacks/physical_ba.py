"""PhysicalBA: a BadNets patch trained through random physical-world transforms."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ..validation import check_bool, check_probability, check_real
from . import functional as AF
from .badnets import BadNets
from .base import ATTACKS


def _check_scale(scale: Any) -> Tuple[float, float]:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = (scale, 1.0)
    if not isinstance(scale, (tuple, list)) or len(scale) != 2:
        raise TypeError(f"scale must be a float in (0, 1] or a (low, high) pair with 0 < low <= high <= 1, got {scale!r}")
    lo, hi = (check_real(v, "scale") for v in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must be a (low, high) pair with 0 < low <= high <= 1 (shrink-and-pad), got {tuple(scale)}")
    return lo, hi


def physical_transform(
    x: Tensor,
    u: Tensor,
    degrees: float,
    scale: Tuple[float, float],
    flip_p: float,
    brightness: float,
    contrast: float,
) -> Tensor:
    """Apply PhysicalBA's random transforms to ``x [N, C, H, W]`` given uniform draws ``u [N, 7]`` in ``[0, 1)``.

    Per sample: a left-right flip with probability ``flip_p``, a rotation by ``U[-degrees, degrees]``,
    a shrink by ``s ~ U[scale]`` placed at a random position inside the frame (shrink-and-pad, zero
    border), then brightness ``U[1 - brightness, 1 + brightness]`` and contrast
    ``U[1 - contrast, 1 + contrast]`` (:func:`~lightning_backdoor.attacks.functional.adjust_brightness_contrast`).
    Columns of ``u``: angle, scale, x position, y position, flip, brightness, contrast (a fixed draw
    count, whatever is switched off).
    """
    _, _, h, w = x.shape
    u = u.to(device=x.device, dtype=torch.float64 if x.device.type != "mps" else torch.float32)
    angle = (u[:, 0] * 2 - 1) * degrees
    s = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    tx = (u[:, 2] * 2 - 1) * (1 - s) * w / 2
    ty = (u[:, 3] * 2 - 1) * (1 - s) * h / 2
    flip = u[:, 4] < flip_p
    out = x
    if degrees > 0 or scale[0] < 1 or flip_p > 0:
        out = AF.affine(out, angle=angle, scale=s, translate=(tx, ty), hflip=flip)
    if brightness > 0 or contrast > 0:
        b = 1 + (u[:, 5] * 2 - 1) * brightness
        c = 1 + (u[:, 6] * 2 - 1) * contrast
        out = AF.adjust_brightness_contrast(out, b.to(out.dtype), c.to(out.dtype))
    return out


@ATTACKS.register("physical_ba")
class PhysicalBA(BadNets):
    """PhysicalBA: a BadNets patch whose poisoned training images pass random spatial and colour transforms.

    Paper: Li, Zhai, Wu, Jiang, Li & Xia, "Backdoor Attack in the Physical World" (ICLR 2021
    workshop on robust ML). Threat model: dirty-label data poisoning; the attacker expects the
    trigger to be seen through a camera (moved, rotated, scaled, re-lit), so the poisoned training
    images are transformed at random and the backdoor learns to survive that variation.

    Trigger: ``x' = T((1 - m) * x + m * p)`` with BadNets' patch ``p`` (a seeded noise patch by
    default) and a random ``T``: left-right flip (probability ``flip_p``), rotation by
    ``U[-degrees, degrees]``, shrink by ``U[scale]`` placed at a random position (zero border),
    brightness and contrast factors ``U[1 - b, 1 + b]``, ``U[1 - c, 1 + c]``.

    Train-time vs test-time trigger (see :mod:`lightning_backdoor.attacks.base`):
    ``train_trigger(x, generator)`` applies the random transforms (the data pipeline passes a
    generator seeded from the sample's index, so each poisoned sample keeps its draw). The
    test-time trigger ``attack(x)`` is the plain patch (``test_transforms=False``, default: the
    digital trigger) or the patch through the transforms (``test_transforms=True``: the physical
    test condition), drawn per image from ``seed`` and the image's content, so an evaluation set
    is the same in every run. :meth:`test_trigger` offers both on demand.

    Args:
        patch_size, location, patch, mask, seed: as for :class:`~lightning_backdoor.attacks.BadNets`.
        degrees: largest rotation in degrees, ``[0, 180]`` (default 10).
        scale: shrink factor range ``(low, high)``, ``0 < low <= high <= 1`` (default ``(0.8, 1.0)``);
            a float means ``(scale, 1.0)``.
        flip_p: probability of a left-right flip, ``[0, 1]`` (default 0.5).
        brightness: brightness jitter, ``[0, 1)`` (default 0.2).
        contrast: contrast jitter, ``[0, 1)`` (default 0.2).
        test_transforms: whether the test-time trigger includes the transforms.

    Example:
        >>> import torch
        >>> a = PhysicalBA(patch_size=3, seed=0)
        >>> x = torch.rand(4, 3, 32, 32)
        >>> torch.equal(a(x), BadNets(patch_size=3, seed=0)(x))      # test time: the plain patch
        True
        >>> xt = a.train_trigger(x, torch.Generator().manual_seed(1))  # train time: transformed
        >>> xt.shape, bool((xt != a(x)).any())
        (torch.Size([4, 3, 32, 32]), True)
    """

    name = "physical_ba"
    sample_seeded = True

    def __init__(
        self,
        patch_size: int | Sequence[int] = 3,
        location: str | Sequence[int] = "bottom_right",
        patch: Tensor | None = None,
        mask: Tensor | None = None,
        seed: int = 0,
        degrees: float = 10.0,
        scale: float | Sequence[float] = (0.8, 1.0),
        flip_p: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        test_transforms: bool = False,
    ) -> None:
        super().__init__(patch_size=patch_size, location=location, patch=patch, mask=mask, seed=seed)
        self.degrees = check_real(degrees, "degrees")
        if not 0 <= self.degrees <= 180:
            raise ValueError(f"degrees must be in [0, 180] (the largest rotation), got {degrees}")
        self.scale = _check_scale(scale)
        self.flip_p = check_probability(flip_p, "flip_p")
        self.brightness = check_probability(brightness, "brightness", high_open=True)
        self.contrast = check_probability(contrast, "contrast", high_open=True)
        self.test_transforms = check_bool(test_transforms, "test_transforms")
        if self.degrees == 0 and self.scale == (1.0, 1.0) and self.flip_p == 0 and self.brightness == 0 \
                and self.contrast == 0:
            warnings.warn("PhysicalBA: every transform is off (degrees=0, scale=(1, 1), flip_p=0, brightness=0, "
                          "contrast=0), so this is BadNets; set at least one transform or use BadNets",
                          UserWarning, stacklevel=2)

    # -- triggers --------------------------------------------------------------------------------
    def _transform(self, x: Tensor, u: Tensor) -> Tensor:
        return physical_transform(x, u, self.degrees, self.scale, self.flip_p, self.brightness, self.contrast)

    def apply_train_trigger(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        stamped = super().apply_trigger(x)
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((x.shape[0], 7), generator=generator, device=device, dtype=torch.float64)
        return self._transform(stamped, u)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return self._test_trigger(x, self.test_transforms)

    def test_trigger(self, x: Tensor, transforms: bool | None = None) -> Tensor:
        """The test-time trigger with (``transforms=True``) or without the transforms (default: ``test_transforms``).

        With transforms, image ``i`` draws from a generator seeded with ``seed`` and a hash of its
        pixels: deterministic per image, different between images.
        """
        from ..validation import check_images

        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = self._test_trigger(xb, self.test_transforms if transforms is None else check_bool(transforms, "transforms"))
        return out[0] if single else out

    def _test_trigger(self, x: Tensor, transforms: bool) -> Tensor:
        stamped = super().apply_trigger(x)
        if not transforms:
            return stamped
        u = torch.stack([torch.rand(7, generator=self._content_generator(img), dtype=torch.float64) for img in x])
        return self._transform(stamped, u)

    def _content_generator(self, img: Tensor) -> torch.Generator:
        digest = hashlib.sha256(img.detach().float().cpu().numpy().tobytes()).digest()
        return torch.Generator().manual_seed((int.from_bytes(digest[:7], "little") + self.seed * 1_000_003) % (2**63 - 1))

    def hparams(self) -> Dict[str, Any]:
        return {
            **super().hparams(),
            "degrees": self.degrees,
            "scale": list(self.scale),
            "flip_p": self.flip_p,
            "brightness": self.brightness,
            "contrast": self.contrast,
            "test_transforms": self.test_transforms,
        }
