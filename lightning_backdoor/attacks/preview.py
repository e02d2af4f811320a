"""Pictures of a trigger: clean / poisoned / difference grids (for W&B and docs/attacks.md).

``trigger_rows(attack, x)`` computes the rows — the clean images, the test-time poisoned images,
the training-time poisoned images when the attack's two triggers differ (PhysicalBA, Adap-*), the
clean-image hook's output when there is one (BATT), and the absolute difference between test-time
poisoned and clean images, scaled so that the largest difference of the batch is white.
``trigger_grid(rows)`` lays them out as one ``uint8`` ``[H, W, 3]`` image. Torch and numpy only.

Example:
    >>> import torch
    >>> from lightning_backdoor.attacks import BadNets
    >>> rows = trigger_rows(BadNets(seed=0), torch.rand(4, 1, 28, 28))
    >>> list(rows)
    ['clean', 'poisoned', 'difference']
    >>> trigger_grid(rows).shape                 # 3 rows of 4 images of 28x28, 2-pixel grey gaps, RGB
    (88, 118, 3)
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch import Tensor

from ..validation import check_images

__all__ = ["trigger_rows", "trigger_grid"]


def trigger_rows(attack, x: Tensor, seed: int = 0) -> Dict[str, Tensor]:
    """``{"clean", "poisoned", ["train-time poisoned"], ["clean (train-time)"], "difference"}`` of images ``x``.

    Args:
        attack: an :class:`~lightning_backdoor.attacks.Attack` (built or not).
        x: clean images ``[N, C, H, W]`` in ``[0, 1]``.
        seed: seeds the generator of random training-time triggers / clean-image transforms.
    """
    x = check_images(x, "x", allow_single=False)
    with torch.no_grad():
        poisoned = attack(x)
        rows: Dict[str, Tensor] = {"clean": x, "poisoned": poisoned}
        if getattr(attack, "differs_at_train_time", False):
            rows["train-time poisoned"] = attack.train_trigger(x, torch.Generator().manual_seed(seed))
        if getattr(attack, "transforms_clean_images", False):
            rows["clean (train-time)"] = attack.clean_train_transform(x, torch.Generator().manual_seed(seed))
        diff = (poisoned - x).abs()
        rows["difference"] = diff / diff.max().clamp_min(1e-12)
    return rows


def trigger_grid(rows: Dict[str, Tensor], pad: int = 2, pad_value: float = 0.35) -> np.ndarray:
    """One ``uint8`` RGB image ``[H, W, 3]``: each entry of ``rows`` (``[N, C, H, W]`` in ``[0, 1]``) is a row.

    Grey images are repeated over RGB; ``pad`` pixels of grey level ``pad_value`` separate the images
    (grey, so that black image borders stay visible).
    """
    tensors = [t.detach().float().cpu().clamp(0, 1) for t in rows.values()]
    if not tensors:
        raise ValueError("rows must hold at least one batch of images")
    n, _, h, w = tensors[0].shape
    if any(t.shape[0] != n or t.shape[-2:] != (h, w) for t in tensors):
        raise ValueError("every row must hold the same number of images of the same size")
    grid = torch.full((3, len(tensors) * (h + pad) - pad, n * (w + pad) - pad), float(pad_value))
    for r, t in enumerate(tensors):
        t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t[:, :3]
        for i in range(n):
            grid[:, r * (h + pad): r * (h + pad) + h, i * (w + pad): i * (w + pad) + w] = t[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
