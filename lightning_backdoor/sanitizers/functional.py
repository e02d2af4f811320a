"""The functional core of the sphere and slab sanitisers (torch only, no Lightning).

Steinhardt, Koh & Liang, "Certified Defenses for Data Poisoning Attacks" (NeurIPS 2017); see
docs/methods.md §6 and docs/sanitizers.md. With class centroids ``μ_y`` (``[K, D]``), a sample
``(x, y)`` is inside

- the **sphere** of its class when ``‖x − μ_y‖₂ ≤ r_y``;
- the **slab** of its class when ``|⟨x − μ_y, μ_y − μ_{−y}⟩| ≤ s_y``.

Multi-class slab: ``μ_{−y}`` is the centroid of *all samples whose label is not* ``y`` (the
class-size-weighted mean of the other centroids, :func:`rest_centroids`); with two classes it is
the other class's centroid, as in the paper. The slab direction ``μ_y − μ_{−y}`` is not normalised
(the paper's form), so ``s_y`` is in units of ``‖μ_y − μ_{−y}‖`` times a distance.

Radii are per class: a percentile of the distances of the fitting samples of that class
(:func:`percentile_radii`, linear interpolation as ``numpy.percentile``).

Example:
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0]])
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> mu = class_centroids(x, y, 2)
    >>> mu.tolist()
    [[1.0, 0.0], [11.0, 10.0]]
    >>> sphere_distances(x, y, mu).tolist()
    [1.0, 1.0, 1.0, 1.0]
    >>> slab_distances(x, y, mu, slab_directions(mu, rest_centroids(x, y, 2))).tolist()
    [10.0, 10.0, 10.0, 10.0]
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_class_labels",
    "check_features",
    "check_percentile",
    "class_centroids",
    "given_radii",
    "percentile_radii",
    "removal_metrics",
    "rest_centroids",
    "slab_directions",
    "slab_distances",
    "sphere_distances",
]


def check_features(features: Any, name: str = "features") -> Tensor:
    """A 2-D floating-point ``[N, D]`` tensor without NaN or Inf."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, D], got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D] (one feature vector per sample), got shape "
                         f"{tuple(features.shape)}; flatten images with x.flatten(1)")
    if not torch.is_floating_point(features):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    if features.numel() and not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(1).sum())
        raise ValueError(f"{name} contain NaN or Inf values ({bad} of {len(features)} samples); "
                         "sanitisers and certificates need finite features")
    return features


def check_class_labels(labels: Any, n: int, name: str = "labels") -> Tensor:
    """A 1-D integer tensor of ``n`` class indices ``>= 0`` (returned as int64 on its device)."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"{name} must have shape [{n}] (one class index per sample), got shape {tuple(labels.shape)}")
    if torch.is_floating_point(labels) or labels.dtype == torch.bool or torch.is_complex(labels):
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0, got {int(labels.min())}")
    return labels.long()


def check_percentile(value: Any, name: str = "percentile") -> float:
    """A real number in ``(0, 100]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a real number in (0, 100], got {value!r}")
    if not 0 < float(value) <= 100:
        raise ValueError(f"{name} must be in (0, 100] (a percentile of the clean distances per class), got {value!r}")
    return float(value)


def _counts(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=num_classes)[:num_classes]


def class_centroids(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean feature vectors ``[K, D]``.

    Raises:
        ValueError: a class in ``range(num_classes)`` has fewer than two samples (a one-sample
            centroid has distance 0 to its only point, so its radius would be 0), or a label is
            ``>= num_classes``.
    """
    features = check_features(features)
    labels = check_class_labels(labels, len(features))
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got {int(labels.max())}")
    counts = _counts(labels.cpu(), num_classes)
    few = [(k, int(c)) for k, c in enumerate(counts.tolist()) if c < 2]
    if few:
        listed = ", ".join(f"class {k}: {c}" for k, c in few[:10])
        raise ValueError(f"every class needs at least 2 samples to estimate its centroid and radius; the fitting "
                         f"set has fewer for {listed} (of {len(labels)} samples, num_classes={num_classes}); "
                         "use a larger (stratified) clean set or pass num_classes for the classes present")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return sums / counts.to(features.device, features.dtype).unsqueeze(1)


def rest_centroids(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``μ_{−y}`` per class ``[K, D]``: the mean of every sample whose label is not ``y``.

    For two classes this is the other class's centroid. Needs at least two classes with samples.
    """
    features = check_features(features)
    labels = check_class_labels(labels, len(features))
    counts = _counts(labels.cpu(), num_classes).to(features.device, features.dtype)
    if int((counts > 0).sum()) < 2:
        raise ValueError("the slab needs samples of at least two classes (its direction is μ_y − μ_{−y})")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return (sums.sum(0, keepdim=True) - sums) / (counts.sum() - counts).clamp_min(1).unsqueeze(1)


def slab_directions(centroids: Tensor, other_centroids: Tensor) -> Tensor:
    """The slab directions ``μ_y − μ_{−y}`` ``[K, D]`` (not normalised, as in the paper)."""
    return centroids - other_centroids


def sphere_distances(features: Tensor, labels: Tensor, centroids: Tensor) -> Tensor:
    """``‖x − μ_y‖₂`` per sample ``[N]``."""
    return (features - centroids[labels]).norm(dim=1)


def slab_distances(features: Tensor, labels: Tensor, centroids: Tensor, directions: Tensor) -> Tensor:
    """``|⟨x − μ_y, μ_y − μ_{−y}⟩|`` per sample ``[N]`` (``directions`` from :func:`slab_directions`)."""
    return ((features - centroids[labels]) * directions[labels]).sum(1).abs()


def percentile_radii(distances: Tensor, labels: Tensor, num_classes: int, percentile: float) -> Tensor:
    """Per-class radius ``[K]``: the ``percentile`` (in ``(0, 100]``) of the distances of that class's samples.

    Linear interpolation between order statistics (``numpy.percentile``'s default); ``100`` is the
    largest distance, so every fitting sample is inside.
    """
    q = check_percentile(percentile) / 100.0
    out = torch.empty(num_classes, dtype=distances.dtype, device=distances.device)
    for k in range(num_classes):
        d = distances[labels == k]
        if d.numel() < 2:
            raise ValueError(f"class {k} has {d.numel()} fitting sample(s); a percentile radius needs at least 2")
        out[k] = torch.quantile(d.double(), q).to(distances.dtype)
    return out


def given_radii(radii: float | Sequence[float] | Tensor, num_classes: int, name: str = "radii") -> Tensor:
    """Radii given by the user: one non-negative value for every class, or one per class."""
    t = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(num_classes).clone()
    if t.numel() != num_classes:
        raise ValueError(f"{name} must be one value or one per class ({num_classes}), got {t.numel()} values")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {t.tolist()}")
    return t


def removal_metrics(removed: Tensor, scores: Tensor, poisoned: Optional[Tensor]) -> Dict[str, float]:
    """How well a sanitiser's removals and scores match the truly poisoned samples.

    Args:
        removed: bool ``[N]``, the samples the sanitiser removed.
        scores: float ``[N]``, its outlier scores (higher = more outlying).
        poisoned: bool ``[N]``, the truly poisoned samples (None for clean training).

    Returns:
        ``removed`` and ``clean_removed`` (counts), and when ``poisoned`` is given ``precision``
        (poisoned share of the removed samples; 0 when nothing was removed, sklearn's
        ``zero_division`` default), ``recall`` (share of the poisoned samples removed; needs at
        least one) and ``auroc`` of ``scores`` against ``poisoned`` (NaN with one class only).

    Example:
        >>> import torch
        >>> m = removal_metrics(torch.tensor([True, False, True]), torch.tensor([2.0, 0.5, 1.5]),
        ...                     torch.tensor([True, False, False]))
        >>> m["precision"], m["recall"], m["auroc"], m["removed"], m["clean_removed"]
        (0.5, 1.0, 1.0, 2, 1)
    """
    from torchmetrics.functional.classification import binary_auroc

    from ..metrics.detection import ranks01

    removed = removed.bool().cpu().reshape(-1)
    scores = scores.detach().double().cpu().reshape(-1)
    if len(scores) != len(removed):
        raise ValueError(f"removed and scores differ in length: {len(removed)} vs {len(scores)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    out: Dict[str, float] = {"removed": int(removed.sum())}
    if poisoned is None:
        out["clean_removed"] = out["removed"]
        return out
    poisoned = poisoned.bool().cpu().reshape(-1)
    if len(poisoned) != len(removed):
        raise ValueError(f"removed and poisoned differ in length: {len(removed)} vs {len(poisoned)}")
    tp = int((removed & poisoned).sum())
    out["clean_removed"] = out["removed"] - tp
    out["precision"] = tp / out["removed"] if out["removed"] else 0.0
    npos = int(poisoned.sum())
    out["recall"] = tp / npos if npos else math.nan
    if 0 < npos < len(poisoned):
        out["auroc"] = float(binary_auroc(ranks01(scores), poisoned.long()))
    else:
        out["auroc"] = math.nan
    return out
