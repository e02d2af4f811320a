"""Margin losses ``ℓ(m)`` of a linear classifier, ``m = y·⟨θ, [x, 1]⟩`` with ``y ∈ {−1, +1}`` (torch only).

``hinge`` (the paper's SVM loss) and ``logistic`` are convex, so the certificate of
:func:`~lightning_backdoor.certified.certify` applies; ``zero_one`` (the classification error) is
for reporting only. All three are non-increasing in the margin, which is what makes the worst
feasible point the one with the smallest margin (docs/certified.md).

Example:
    >>> import torch
    >>> get_loss("hinge")(torch.tensor([-1.0, 0.5, 2.0])).tolist()
    [2.0, 0.5, 0.0]
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSSES", "MarginLoss", "get_loss", "get_convex_loss"]


class MarginLoss(NamedTuple):
    """A loss of the margin: ``value(m)``, a (sub)gradient ``grad(m)``, whether it is convex, and
    ``smooth(m, mu) -> (gradient, curvature)``: the gradient of a smooth surrogate within ``mu`` of the
    loss (the loss itself when it is smooth) and a bound on its second derivative (None: no surrogate)."""

    name: str
    value: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]
    convex: bool
    smooth: Optional[Callable[[Tensor, float], Tuple[Tensor, float]]] = None

    def __call__(self, margins: Tensor) -> Tensor:
        return self.value(margins)


def _huber_hinge(m: Tensor, mu: float) -> Tuple[Tensor, float]:
    """Gradient of the hinge smoothed over ``(1 − mu, 1)`` (a quadratic piece; at most ``mu/2`` below the hinge)."""
    g = torch.where(m >= 1, torch.zeros_like(m), torch.where(m > 1 - mu, -(1 - m) / mu, -torch.ones_like(m)))
    return g, 1.0 / mu


LOSSES: Dict[str, MarginLoss] = {
    "hinge": MarginLoss("hinge", lambda m: (1 - m).clamp_min(0), lambda m: -(m < 1).to(m.dtype), True, _huber_hinge),
    "logistic": MarginLoss("logistic", lambda m: F.softplus(-m), lambda m: -torch.sigmoid(-m), True,
                           lambda m, mu: (-torch.sigmoid(-m), 0.25)),
    "zero_one": MarginLoss("zero_one", lambda m: (m <= 0).to(m.dtype), lambda m: torch.zeros_like(m), False),
}


def get_loss(loss: str | MarginLoss) -> MarginLoss:
    """A :class:`MarginLoss` by name (``"hinge"``, ``"logistic"``, ``"zero_one"``), or ``loss`` itself."""
    if isinstance(loss, MarginLoss):
        return loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a MarginLoss, got {loss!r}")
    return LOSSES[loss]


def get_convex_loss(loss: str | MarginLoss) -> MarginLoss:
    """:func:`get_loss`, refusing a non-convex loss (the certificate's minimax argument needs convexity)."""
    out = get_loss(loss)
    if not out.convex:
        convex = sorted(k for k, v in LOSSES.items() if v.convex)
        raise ValueError(f"loss {out.name!r} is not convex, so no certificate can be computed for it: the bound "
                         f"(docs/certified.md) swaps min and max, which needs a convex loss; use one of {convex}")
    return out
