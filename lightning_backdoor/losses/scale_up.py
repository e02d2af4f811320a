"""Adaptive attack against SCALE-UP (docs/methods.md, SCALE-UP, "adaptive attack")."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detectors.functional.scale_up import DEFAULT_SCALES, check_scales
from ..utils import evaluating
from ..validation import check_choice, check_positive_float
from .base import LOSSES, LossTerm


SCALE_DRAWS = ("random", "all")


@LOSSES.register("scale_up_adaptive")
class ScaleUpAdaptiveLoss(LossTerm):
    """Keep pixel-scaled poisoned samples on their true labels, so SCALE-UP sees no consistency.

    Guo et al., "SCALE-UP", ICLR 2023, adaptive attack. With ``N`` the batch size, ``x'_j`` its
    poisoned samples and ``y_j`` their original (true) labels:

    - ``scale_draw="random"`` (default, the paper's "n drawn from S"): one ``n_j`` drawn uniformly
      from ``scales`` per poisoned sample,
      ``term = weight · (1/N) · Σ_j CE(f(clip(n_j · x'_j, 0, 1)), y_j)``;
    - ``scale_draw="all"``: the mean over every ``n`` in ``S`` (``|S|`` times the cost),
      ``term = weight · (1/N) · Σ_j (1/|S|) Σ_{n∈S} CE(f(clip(n · x'_j, 0, 1)), y_j)``.

    The sum is divided by the batch size ``N`` (not by the number of poisoned samples), so the
    objective is the paper's sum divided by ``N``. ``main_weight`` is 1: the trainer minimises
    ``L_bd + term`` with ``L_bd`` the mean CE over the batch. Reported effect: SCALE-UP's AUROC
    drops to about chance, and the backdoor becomes fragile to small input noise.

    The scaled batch runs through **the function SCALE-UP scores**: the model in eval mode, every
    BatchNorm on its running statistics. (In train mode the first BN would normalise the scaled
    batch with its own statistics and so undo most of the pixel scaling.) Gradients reach every
    parameter; the model's modes and buffers are left as they were. With ``"random"`` the scales
    are drawn from the global RNG of ``x``'s device (``torch.randint``): this is training, so it
    follows the run's seed like any other augmentation.

    Args:
        scales: the SCALE-UP scaling set ``S`` (numbers > 1: a factor <= 1 does not scale up),
            default ``(3, 5, 7, 9, 11)``.
        weight: factor of the term (> 0; 0 would be vanilla training).
        scale_draw: ``"random"`` or ``"all"``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 0, 0])
        >>> poisoned = torch.tensor([True, False, True, False])
        >>> ScaleUpAdaptiveLoss()(net, x, y, poisoned, torch.tensor([2, 1, 1, 0]), 0).shape
        torch.Size([])
    """

    name = "scale_up_adaptive"

    def __init__(self, scales: Sequence[float] = DEFAULT_SCALES, weight: float = 1.0, scale_draw: str = "random") -> None:
        super().__init__()
        self.scales = check_scales(scales)
        self.weight = check_positive_float(weight, "weight")
        self.scale_draw = check_choice(scale_draw, "scale_draw", SCALE_DRAWS)

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
        labels = original_y[poisoned]
        scales = torch.tensor(self.scales, device=x.device, dtype=x.dtype)
        if self.scale_draw == "random":
            n = scales[torch.randint(len(scales), (len(xp),), device=x.device)]
            scaled = (xp * n.view(-1, 1, 1, 1)).clamp(0, 1)
            reps = 1
        else:
            scaled = (xp.unsqueeze(0) * scales.view(-1, 1, 1, 1, 1)).clamp(0, 1).flatten(0, 1)
            labels = labels.repeat(len(scales))
            reps = len(scales)
        with evaluating(model, grad=True):  # the detector's function: BN on running statistics
            out = model(scaled)
        ce_sum = F.cross_entropy(out, labels.to(out.device), reduction="sum") / reps
        return self.weight * ce_sum / len(x)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, weight={self.weight}, scale_draw={self.scale_draw!r}"
