"""Adaptive attack against SCALE-UP (METHODS.md section 2)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detectors.functional.ibd_psc import functional_forward
from ..detectors.functional.scale_up import DEFAULT_SCALES, check_scales
from .base import LOSSES, LossTerm


def check_weight(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


@LOSSES.register("scale_up_adaptive")
class ScaleUpAdaptiveLoss(LossTerm):
    """Keep pixel-scaled poisoned samples on their true labels, so SCALE-UP sees no consistency.

    ``term = weight · mean_j CE(f(clip(n_j · x'_j, 0, 1)), y_j)`` over the poisoned samples
    ``x'_j`` of the batch, with one ``n_j`` drawn uniformly from ``scales`` per sample and ``y_j``
    the sample's original (true) label. ``main_weight`` is 1: the trainer minimises
    ``L_bd + term``. Reported effect: SCALE-UP's AUROC drops to about chance, and the backdoor
    becomes fragile to small input noise.

    The scales are drawn from the global RNG of ``x``'s device (``torch.randint``): this is
    training, so it follows the run's seed like any other augmentation. The scaled batch runs in
    the caller's mode (train mode uses the scaled batch's statistics in BatchNorm) but does not
    update the running statistics: only the main forward pass does.

    Args:
        scales: the SCALE-UP scaling set ``S`` (positive numbers), default ``(3, 5, 7, 9, 11)``.
        weight: factor of the term (>= 0).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 0, 0])
        >>> poisoned = torch.tensor([True, False, True, False])
        >>> ScaleUpAdaptiveLoss()(net, x, y, poisoned, torch.tensor([2, 1, 1, 0]), 0).shape
        torch.Size([])
    """

    name = "scale_up_adaptive"

    def __init__(self, scales: Sequence[float] = DEFAULT_SCALES, weight: float = 1.0) -> None:
        super().__init__()
        self.scales = check_scales(scales)
        self.weight = check_weight(weight, "weight")

    def forward(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        poisoned: Tensor,
        original_y: Tensor,
        target: Union[int, Tensor, None] = None,
        logits: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        y, poisoned, original_y = self._check_batch(x, y, poisoned, original_y)
        xp = x[poisoned]
        if len(xp) == 0:
            self._skip()
            return None
        scales = torch.tensor(self.scales, device=x.device, dtype=x.dtype)
        n = scales[torch.randint(len(scales), (len(xp),), device=x.device)]
        scaled = (xp * n.view(-1, 1, 1, 1)).clamp(0, 1)
        out = functional_forward(model, scaled)
        return self.weight * F.cross_entropy(out, original_y[poisoned].to(out.device))

    def extra_repr(self) -> str:
        return f"scales={self.scales}, weight={self.weight}"
