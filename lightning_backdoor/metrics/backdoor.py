"""Benign accuracy (BA) and attack success rate (ASR): functions and DDP-correct torchmetrics.

BA = accuracy on clean test data. ASR = share of poisoned inputs *whose true label is not the
target* that the model classifies as the target (docs/methods.md, notation). Both metrics keep
``correct``/``total`` counters reduced by summation, so under DDP every rank's samples count
once — no averaging of per-batch numbers.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric


def _preds(logits_or_preds: Tensor) -> Tensor:
    return logits_or_preds.argmax(dim=-1) if logits_or_preds.dim() == 2 else logits_or_preds


def benign_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Share of ``labels`` predicted correctly (``logits`` ``[N, K]`` or predicted labels ``[N]``)."""
    preds = _preds(logits)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    if labels.numel() == 0:
        return torch.tensor(float("nan"))
    return (preds == labels).float().mean()


def attack_success_rate(logits: Tensor, target: int, original_labels: Optional[Tensor] = None) -> Tensor:
    """Share of poisoned inputs classified as ``target``, over those whose true label is not ``target``."""
    preds = _preds(logits)
    keep = torch.ones_like(preds, dtype=torch.bool) if original_labels is None else original_labels != target
    if int(keep.sum()) == 0:
        return torch.tensor(float("nan"))
    return (preds[keep] == target).float().mean()


class _Rate(Metric):
    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        if int(self.total) == 0:
            warnings.warn(f"{type(self).__name__}.compute() saw no samples (an empty evaluation set, or a poisoned set "
                          "whose every true label is the target); returning NaN", UserWarning, stacklevel=2)
            return torch.tensor(float("nan"), device=self.correct.device)
        return self.correct.float() / self.total.float()


class BenignAccuracy(_Rate):
    """Accuracy on clean inputs. ``update(logits_or_preds, labels)``."""

    def update(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        preds = _preds(logits)
        self.correct += (preds == labels).sum()
        self.total += labels.numel()


class AttackSuccessRate(_Rate):
    """Share of triggered inputs (true label ≠ target) predicted as ``target``.

    ``update(logits_or_preds, original_labels=None, target=None)``: samples whose true label is the
    target are excluded when ``original_labels`` is given.
    """

    def __init__(self, target: Optional[int] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.target = target

    def update(self, logits: Tensor, original_labels: Optional[Tensor] = None, target: Optional[int] = None) -> None:  # type: ignore[override]
        t = self.target if target is None else target
        if t is None:
            raise ValueError("AttackSuccessRate needs target=<label>, at construction or in update()")
        preds = _preds(logits)
        keep = torch.ones_like(preds, dtype=torch.bool) if original_labels is None else original_labels != t
        self.correct += (preds[keep] == t).sum()
        self.total += keep.sum()
