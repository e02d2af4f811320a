"""Detection metrics on continuous detector scores (torch + torchmetrics only; docs/methods.md §7).

    detection_metrics(scores, is_poisoned, threshold=0.5)
    # {"auroc": ..., "f1": ..., "tpr@fpr1": ..., "tpr@fpr5": ...}

    metric = DetectionMetrics(threshold=0.5)     # torchmetrics.Metric, DDP-safe ("cat" states)
    for scores, is_poisoned in batches:
        metric.update(scores, is_poisoned)
    metric.compute()                             # same dict, over everything seen

Scores follow the detector convention: higher = more likely poisoned. AUROC and TPR@FPR are
computed on the continuous scores (never on thresholded decisions); F1 uses
``scores > threshold``. Scores are rank-transformed to [0, 1] before they reach torchmetrics,
because torchmetrics applies a sigmoid to predictions outside [0, 1], which saturates in float32
(e.g. 20 and 30 both become 1.0) and would tie distinct scores.

``tpr@fpr1`` / ``tpr@fpr5`` are the best true-positive rate among the ROC's operating points whose
false-positive rate is at most 1 % / 5 %, with no interpolation between points. All inputs with the
same score are flagged together, so ties decide what is reachable: when more than 1 % (5 %) of the
benign scores equal the top score (e.g. IBD-PSC's PSC saturating at 1.0, or SCALE-UP's few SPC levels),
no threshold stays within that FPR while flagging them, and TPR@FPR can be 0 at a high AUROC.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_roc
from torchmetrics.utilities import dim_zero_cat

METRIC_KEYS = ("auroc", "f1", "tpr@fpr1", "tpr@fpr5")
_FPR_LEVELS = {"tpr@fpr1": 0.01, "tpr@fpr5": 0.05}


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(float(threshold)):
        raise TypeError(f"threshold must be a real number (not NaN), got {threshold!r}")
    return float(threshold)


def _check_inputs(scores: Any, is_poisoned: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(scores, Tensor) or not torch.is_floating_point(scores):
        got = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"scores must be a floating-point Tensor of detector scores, got {got}")
    if not isinstance(is_poisoned, Tensor):
        raise TypeError(f"is_poisoned must be a bool or 0/1 integer Tensor, got {type(is_poisoned).__name__}")
    scores, is_poisoned = scores.detach().flatten(), is_poisoned.detach().flatten()
    if scores.numel() != is_poisoned.numel():
        raise ValueError(
            f"scores and is_poisoned must have the same number of elements, got {scores.numel()} and {is_poisoned.numel()}"
        )
    if torch.is_floating_point(is_poisoned) or torch.is_complex(is_poisoned):
        raise TypeError(f"is_poisoned must be a bool or 0/1 integer Tensor, got dtype {is_poisoned.dtype}")
    if is_poisoned.numel() and not bool(((is_poisoned == 0) | (is_poisoned == 1)).all()):
        raise ValueError(f"is_poisoned must contain only 0/1 (or False/True), got values {is_poisoned.unique().tolist()}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or Inf; detector scores must be finite")
    return scores, is_poisoned.long()


def ranks01(scores: Tensor) -> Tensor:
    """Dense ranks scaled to [0, 1] in float64: order and ties preserved, so the ROC is unchanged."""
    uniq, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    return inverse.double() / max(len(uniq) - 1, 1)


def detection_metrics(scores: Tensor, is_poisoned: Tensor, threshold: float) -> Dict[str, Tensor]:
    """AUROC, F1 at ``threshold`` and TPR at FPR <= 1% / 5% of a detector's scores.

    Args:
        scores: float ``Tensor[N]`` (higher = more likely poisoned).
        is_poisoned: bool or 0/1 ``Tensor[N]``: 1 for poisoned (positive) samples.
        threshold: F1 is computed on the decisions ``scores > threshold``.

    Returns:
        dict with 0-dim float tensors under ``"auroc"``, ``"f1"``, ``"tpr@fpr1"``, ``"tpr@fpr5"``.
        With one class only, AUROC and TPR are NaN (with a warning); if all scores are equal,
        AUROC is 0.5 (with a warning).

    Example:
        >>> m = detection_metrics(torch.tensor([0.1, 0.9, 0.4, 0.8]), torch.tensor([0, 1, 0, 1]), 0.5)
        >>> float(m["auroc"]), float(m["f1"])
        (1.0, 1.0)
    """
    threshold = _check_threshold(threshold)
    scores, target = _check_inputs(scores, is_poisoned)
    if scores.numel() == 0:
        raise ValueError("scores is empty; detection metrics need at least one positive and one negative sample")
    device = scores.device

    flagged = scores > threshold
    positive = target.bool()
    tp = int((flagged & positive).sum())
    fp = int((flagged & ~positive).sum())
    fn = int((~flagged & positive).sum())
    denom = 2 * tp + fp + fn
    f1 = 2 * tp / denom if denom else 0.0  # sklearn's zero_division default
    out: Dict[str, Tensor] = {"f1": torch.tensor(f1, dtype=torch.float32, device=device)}

    num_pos = int(positive.sum())
    num_neg = len(target) - num_pos
    if num_pos == 0 or num_neg == 0:
        warnings.warn(
            f"detection_metrics: only one class present ({num_pos} poisoned, {num_neg} benign); "
            "AUROC and TPR@FPR are undefined and returned as NaN",
            UserWarning,
            stacklevel=2,
        )
        nan = torch.tensor(math.nan, dtype=torch.float32, device=device)
        out.update({"auroc": nan, "tpr@fpr1": nan.clone(), "tpr@fpr5": nan.clone()})
        return {k: out[k] for k in METRIC_KEYS}
    if bool((scores == scores[0]).all()):
        warnings.warn(
            "detection_metrics: all scores are equal, so the detector does not separate the classes (AUROC 0.5)",
            UserWarning,
            stacklevel=2,
        )

    preds = ranks01(scores)
    out["auroc"] = binary_auroc(preds, target).float()
    fpr, tpr, _ = binary_roc(preds, target)
    fpr, tpr = fpr.double(), tpr.double()
    for key, level in _FPR_LEVELS.items():
        # the ROC always contains (0, 0), so the mask is never empty
        out[key] = tpr[fpr <= level + 1e-9].max().float()
    return {k: out[k] for k in METRIC_KEYS}


class DetectionMetrics(Metric):
    """Accumulates detector scores and labels and computes :func:`detection_metrics` over all of them.

    States are lists of raw scores and labels reduced with ``"cat"``, so the result under DDP equals
    the result on the concatenated data of all ranks.

    Args:
        threshold: F1 is computed on ``scores > threshold`` (may be changed before ``compute``).

    Example:
        >>> metric = DetectionMetrics(threshold=0.5)
        >>> metric.update(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([0.4, 0.8]), torch.tensor([0, 1]))
        >>> float(metric.compute()["auroc"])
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = _check_threshold(threshold)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_poisoned: Tensor) -> None:  # type: ignore[override]
        scores, target = _check_inputs(scores, is_poisoned)
        self.scores.append(scores.double())  # float64: near-1 scores must not tie
        self.target.append(target)

    def compute(self) -> Dict[str, Tensor]:
        # after a DDP sync the "cat" states are already concatenated tensors, not lists
        if (isinstance(self.scores, Tensor) and self.scores.numel() == 0) or (
                isinstance(self.scores, list) and not self.scores):
            raise ValueError("DetectionMetrics.compute() called before any update(scores, is_poisoned)")
        return detection_metrics(dim_zero_cat(self.scores), dim_zero_cat(self.target), self.threshold)
