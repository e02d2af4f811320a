"""DeepSweep-style detection by prediction change under input transformations, in pure torch (no Lightning).

Qiu et al., "DeepSweep: An Evaluation Framework for Mitigating DNN Backdoor Attacks using Data
Augmentation", AsiaCCS 2021. DeepSweep evaluates many augmentation functions as inference-time
pre-processing and finds that affine transformations, smoothing filters and lossy re-quantisation
/ re-sampling invalidate triggers while keeping benign predictions. As a detector (how SCALE-UP and
IBD-PSC use it as a baseline) the score is the share of transformed copies whose prediction differs
from the prediction on the input (docs/methods.md §4). Label-only.

The transformations (``DEEP_SWEEP_TRANSFORMS``), one family each from the paper's most effective
ones, each a batched function on the input's device that returns new tensors:

- ``"affine"``: ``n_affine`` random affine copies (rotation ±15°, translation ±10 % of the size,
  scale 0.9-1.1; bilinear, zero fill), parameters drawn per input;
- ``"median"``: 3x3 median filter (reflect padding);
- ``"gaussian_blur"``: 3x3 Gaussian blur, σ = 1 (torchvision);
- ``"bit_depth"``: re-quantisation to 3 bits per channel;
- ``"resample"``: down-sampling to half the size (antialiased bilinear) and back up (bilinear).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .consistency import label_change_rate, variant_labels

DEEP_SWEEP_TRANSFORMS: Tuple[str, ...] = ("affine", "median", "gaussian_blur", "bit_depth", "resample")
#: ranges of the random affine copies: rotation (degrees), translation (share of the size), scale
AFFINE_ROTATION, AFFINE_TRANSLATION, AFFINE_SCALE = 15.0, 0.1, (0.9, 1.1)


def check_transforms(transforms: object) -> Tuple[str, ...]:
    """A non-empty sequence of distinct names from ``DEEP_SWEEP_TRANSFORMS``."""
    if isinstance(transforms, str) or not hasattr(transforms, "__iter__"):
        raise TypeError(f"transforms must be a sequence of names from {list(DEEP_SWEEP_TRANSFORMS)}, got {transforms!r}")
    names = tuple(transforms)  # type: ignore[arg-type]
    if not names:
        raise ValueError(f"transforms must name at least one of {list(DEEP_SWEEP_TRANSFORMS)}")
    for t in names:
        if t not in DEEP_SWEEP_TRANSFORMS:
            raise ValueError(f"unknown DeepSweep transform {t!r}; known transforms: {', '.join(DEEP_SWEEP_TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"transforms must be distinct, got {list(names)}")
    return names


def random_affine_params(num: int, generator: torch.Generator | None = None) -> Tensor:
    """``[num, 4]`` affine parameters ``(angle in degrees, shift_x, shift_y, scale)`` drawn uniformly
    from the ranges above (shifts as a share of the image size)."""
    u = torch.rand(num, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * AFFINE_ROTATION
    shift = (u[:, 1:3] * 2 - 1) * AFFINE_TRANSLATION
    scale = AFFINE_SCALE[0] + u[:, 3] * (AFFINE_SCALE[1] - AFFINE_SCALE[0])
    return torch.cat([angle[:, None], shift, scale[:, None]], dim=1)


def affine(x: Tensor, params: Tensor) -> Tensor:
    """Rotate by ``params[:, 0]`` degrees about the centre, scale by ``params[:, 3]`` and shift by
    ``params[:, 1:3]`` (share of width / height), per image; bilinear sampling, zeros outside."""
    p = params.to(device=x.device, dtype=x.dtype)
    a = p[:, 0] * (math.pi / 180.0)
    inv = 1.0 / p[:, 3]
    cos, sin = torch.cos(a) * inv, torch.sin(a) * inv
    # output -> input sampling map in normalised [-1, 1] coordinates (inverse of the forward transform)
    tx, ty = -2.0 * p[:, 1], -2.0 * p[:, 2]
    theta = torch.stack([torch.stack([cos, sin, cos * tx + sin * ty], dim=1),
                         torch.stack([-sin, cos, -sin * tx + cos * ty], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0.0, 1.0)


def median_filter(x: Tensor, size: int = 3) -> Tensor:
    """``size x size`` median filter with reflect padding (the lower median for even counts)."""
    pad = size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    patches = padded.unfold(2, size, 1).unfold(3, size, 1)  # [N, C, H, W, size, size]
    return patches.reshape(*patches.shape[:4], -1).median(dim=-1).values


def gaussian_blur(x: Tensor, sigma: float = 1.0, kernel_size: int = 3) -> Tensor:
    """Gaussian blur (torchvision's ``gaussian_blur``, reflect padding)."""
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    return tv_blur(x, [kernel_size, kernel_size], [sigma, sigma])


def bit_depth(x: Tensor, bits: int = 3) -> Tensor:
    """Re-quantise to ``bits`` bits per channel: ``round(x * (2^bits - 1)) / (2^bits - 1)``."""
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


def resample(x: Tensor, factor: float = 0.5) -> Tensor:
    """Down-sample by ``factor`` (antialiased bilinear) and up-sample back to the size (bilinear)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="bilinear",
                          align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


_FIXED = {"median": median_filter, "gaussian_blur": gaussian_blur, "bit_depth": bit_depth, "resample": resample}


def num_deep_sweep_variants(transforms: Sequence[str], n_affine: int) -> int:
    """Number of transformed copies per input: ``n_affine`` for ``"affine"``, one for each other transform."""
    return sum(n_affine if t == "affine" else 1 for t in transforms)


def deep_sweep_plan(transforms: Sequence[str], n_affine: int) -> list:
    """The copies in order: ``(transform, affine copy index or -1)`` per variant."""
    plan = []
    for t in transforms:
        plan.extend((t, v) for v in range(n_affine)) if t == "affine" else plan.append((t, -1))
    return plan


def deep_sweep_variant(x: Tensor, transform: str, affine_params: Tensor | None = None, copy: int = 0) -> Tensor:
    """One transformed copy of every input (``affine_params[:, copy]`` for ``"affine"``); ``x`` is untouched."""
    if transform == "affine":
        if affine_params is None or affine_params.dim() != 3 or affine_params.shape[0] != len(x):
            raise ValueError(f"affine_params must have shape [{len(x)}, n_affine, 4] when 'affine' is used")
        return affine(x, affine_params[:, copy])
    return _FIXED[transform](x)


def deep_sweep_variants(x: Tensor, transforms: Sequence[str], affine_params: Tensor | None = None) -> Tensor:
    """All transformed copies of ``x``, variant-major (``[V * N, C, H, W]``), in the order of ``transforms``."""
    n_affine = affine_params.shape[1] if affine_params is not None else 0
    return torch.cat([deep_sweep_variant(x, t, affine_params, v) for t, v in deep_sweep_plan(transforms, n_affine)])


def deep_sweep_score(model: nn.Module, x: Tensor, transforms: Sequence[str] = DEEP_SWEEP_TRANSFORMS,
                     affine_params: Tensor | None = None, *, batch_size: int | None = None) -> Tensor:
    """Share of the transformed copies of each input whose label differs from ``C(x)`` (``Tensor[N]`` in [0, 1]).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        >>> params = random_affine_params(4 * 2, torch.Generator().manual_seed(0)).view(4, 2, 4)
        >>> deep_sweep_score(net, torch.rand(4, 1, 8, 8), affine_params=params).shape
        torch.Size([4])
    """
    transforms = check_transforms(transforms)
    n_affine = affine_params.shape[1] if (affine_params is not None and "affine" in transforms) else 0
    if "affine" in transforms and n_affine == 0:
        raise ValueError("affine_params must hold at least one affine copy per input when 'affine' is used")
    plan = deep_sweep_plan(transforms, n_affine)

    def make(xc: Tensor, v: int) -> Tensor:
        return deep_sweep_variant(xc, plan[v][0], affine_params, plan[v][1])

    pred, labels = variant_labels(model, x, make, len(plan), batch_size=batch_size)
    return label_change_rate(pred, labels)
