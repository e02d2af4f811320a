"""Detector plots: ROC curve and benign-vs-poisoned score histograms, rendered with matplotlib (Agg)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from torch import Tensor


def _figure_to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return img


def roc_points(scores: Tensor, labels: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr) of continuous ``scores`` (higher = poisoned) against 0/1 ``labels``."""
    from torchmetrics.functional.classification import binary_roc

    from .metrics.detection import ranks01

    fpr, tpr, _ = binary_roc(ranks01(scores.double()).float(), labels.long())
    return fpr.numpy(), tpr.numpy()


def roc_and_histogram(scores: Tensor, labels: Tensor, title: str = "", threshold: Optional[float] = None):
    """Two RGB images (H, W, 3 uint8): the ROC curve and the score histograms of both classes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fpr, tpr = roc_points(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false positive rate (benign flagged)")
    ax.set_ylabel("true positive rate (poisoned flagged)")
    ax.set_title(f"ROC {title}", fontsize=9)
    roc_img = _figure_to_array(fig)

    s, y = scores.double().numpy(), labels.numpy().astype(bool)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    bins = np.histogram_bin_edges(s, bins=30) if np.ptp(s) > 0 else 10
    ax.hist(s[~y], bins=bins, alpha=0.6, label=f"benign (n={int((~y).sum())})")
    ax.hist(s[y], bins=bins, alpha=0.6, label=f"poisoned (n={int(y.sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, c="k", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("score (higher = more likely poisoned)")
    ax.set_title(f"scores {title}", fontsize=9)
    ax.legend(fontsize=8)
    hist_img = _figure_to_array(fig)
    return roc_img, hist_img
