"""The common interface of training-set sanitisers (torch only, no Lightning).

A sanitiser removes training samples that lie outside a feasible set before training (Steinhardt,
Koh & Liang, NeurIPS 2017; docs/methods.md §6, docs/sanitizers.md)::

    san = create_sanitizer("sphere", mode="oracle", percentile=70)
    result = san.sanitize(train_features, train_labels, clean=(clean_features, clean_labels))
    result.keep     # bool Tensor[N]: the samples to train on
    result.scores   # float Tensor[N]: outlier score, higher = more outlying; keep == (scores <= 1)

- ``fit(features, labels)`` estimates what the feasible set needs (centroids, radii) from the
  samples given; ``score`` / ``keep`` apply it to any samples.
- *oracle* mode (``mode="oracle"``): ``sanitize`` fits on a trusted clean set; *data-dependent*
  mode (``mode="data"``): it fits on the very samples being sanitised (poisoned ones included).
- ``features``: the feature space the data module computes before calling ``sanitize``
  (:class:`~lightning_backdoor.sanitizers.PixelFeatures` by default, or
  :class:`~lightning_backdoor.sanitizers.ModelFeatures`).

Sanitisers are plain objects; fitted state round-trips through ``state_dict`` /
``load_state_dict`` with tensors and plain values only.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..registry import Registry
from ..validation import check_choice
from .features import FeatureExtractor, PixelFeatures
from .functional import (check_class_labels, check_features, check_percentile, class_centroids, given_radii,
                         percentile_radii)

SANITIZERS = Registry("sanitizer")

MODES = ("oracle", "data")


def create_sanitizer(name: str, **kwargs: Any) -> "Sanitizer":
    """Build a registered sanitiser by name, e.g. ``create_sanitizer("slab", mode="data")``."""
    return SANITIZERS.create(name, **kwargs)


def list_sanitizers(pattern: str = "*") -> list[str]:
    """Names of registered sanitisers matching an fnmatch ``pattern``."""
    return SANITIZERS.list(pattern)


class SanitizeResult(NamedTuple):
    """What :meth:`Sanitizer.sanitize` returns: ``keep`` (bool ``[N]``) and ``scores`` (float ``[N]``)."""

    keep: Tensor
    scores: Tensor


class Sanitizer:
    """Base class. Subclasses set ``name`` and implement :meth:`fit` and :meth:`score`.

    Contract (tested for every registered sanitiser): ``score`` returns a float ``Tensor[N]`` of
    finite-or-``+inf`` values, higher = more outlying, and ``keep`` is exactly ``score <= 1``;
    fitting and scoring never touch the global random state; ``state_dict`` holds tensors and
    plain values only.

    Args:
        mode: ``"oracle"`` (fit on a trusted clean set) or ``"data"`` (fit on the training set
            being sanitised).
        features: the feature space (``None``: raw pixels).
    """

    name: str = "sanitizer"

    def __init__(self, mode: str = "oracle", features: Optional[FeatureExtractor] = None) -> None:
        self.mode = check_choice(mode, "mode", MODES)
        if features is not None and not callable(features):
            raise TypeError(f"features must be a FeatureExtractor (e.g. PixelFeatures(), ModelFeatures(net)) or None, "
                            f"got {type(features).__name__}")
        self.features: FeatureExtractor = PixelFeatures() if features is None else features
        self.fitted = False

    # -- interface -------------------------------------------------------------------------------
    def fit(self, features: Tensor, labels: Tensor, num_classes: Optional[int] = None) -> "Sanitizer":
        raise NotImplementedError

    def score(self, features: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def keep(self, features: Tensor, labels: Tensor) -> Tensor:
        """bool ``[N]``: inside the feasible set (``score <= 1``)."""
        return self.score(features, labels) <= 1

    def sanitize(self, features: Tensor, labels: Tensor, clean: Optional[Tuple[Tensor, Tensor]] = None,
                 num_classes: Optional[int] = None) -> SanitizeResult:
        """Fit (on ``clean`` in oracle mode, on ``features`` in data mode) and score ``features``.

        Args:
            features / labels: the training samples to sanitise (``[N, D]``, ``[N]``: the training
                labels as given, i.e. the target for dirty-label poisoned samples).
            clean: ``(features, labels)`` of the trusted clean set (oracle mode only).
            num_classes: number of classes (default: one more than the largest label seen).
        """
        features = check_features(features)
        labels = check_class_labels(labels, len(features))
        if self.mode == "oracle":
            if clean is None:
                raise ValueError(f"{type(self).__name__}(mode='oracle') needs a trusted clean set: pass "
                                 "clean=(features, labels), or use mode='data' to fit on the training set itself")
            cf, cl = clean
            cf = check_features(cf, "clean features")
            cl = check_class_labels(cl, len(cf), "clean labels")
            if cf.shape[1] != features.shape[1]:
                raise ValueError(f"clean features have {cf.shape[1]} dimensions but the training features "
                                 f"{features.shape[1]}; compute both in the same feature space")
        else:
            cf, cl = features, labels
        if num_classes is None:
            num_classes = int(max(int(labels.max()) if len(labels) else 0, int(cl.max()) if len(cl) else 0)) + 1
        self.fit(cf, cl, num_classes)
        scores = self.score(features, labels)
        return SanitizeResult(scores <= 1, scores)

    def hparams(self) -> Dict[str, Any]:
        """Settings to record with a run (plain values)."""
        return {"mode": self.mode, "features": repr(self.features)}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.fitted = bool(state.get("fitted", False))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} must be fitted before scoring: call fit(features, labels) "
                               "or sanitize(...)")


class CentroidSanitizer(Sanitizer):
    """Shared part of the sphere and slab sanitisers: class centroids and per-class radii.

    Subclasses implement :meth:`_fit_geometry` (what besides the centroids the set needs) and
    :meth:`distances` (the per-sample distance compared with the class radius). The score is
    ``distance / radius_y`` (``+inf`` for a positive distance to a zero radius), so ``score <= 1``
    is exactly "inside".

    Args:
        mode: ``"oracle"`` or ``"data"`` (see :class:`Sanitizer`).
        percentile: radius of class ``y`` = this percentile, in ``(0, 100]``, of the distances of
            the fitting samples of class ``y`` (default 70, the published code's choice).
        radii: fixed radii instead (one value or one per class); overrides ``percentile``.
        features: the feature space (``None``: raw pixels).
    """

    def __init__(self, mode: str = "oracle", percentile: float = 70.0,
                 radii: Optional[float | Sequence[float]] = None, features: Optional[FeatureExtractor] = None) -> None:
        super().__init__(mode, features)
        self.percentile = check_percentile(percentile)
        if radii is not None:
            given_radii(radii, 1 if isinstance(radii, (int, float)) else len(radii))  # checks values now
            radii = float(radii) if isinstance(radii, (int, float)) else [float(r) for r in radii]
        self.given = radii
        self.centroids: Optional[Tensor] = None
        self.radii: Optional[Tensor] = None

    def _fit_geometry(self, features: Tensor, labels: Tensor, num_classes: int) -> None:
        """Estimate what :meth:`distances` needs besides ``self.centroids`` (nothing by default)."""

    def distances(self, features: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def fit(self, features: Tensor, labels: Tensor, num_classes: Optional[int] = None) -> "CentroidSanitizer":
        features = check_features(features)
        labels = check_class_labels(labels, len(features)).to(features.device)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.centroids = class_centroids(features, labels, num_classes)
        self._fit_geometry(features, labels, num_classes)
        if self.given is not None:
            self.radii = given_radii(self.given, num_classes).to(features.device, features.dtype)
        else:
            self.radii = percentile_radii(self.distances(features, labels), labels, num_classes, self.percentile)
        self.fitted = True
        return self

    def score(self, features: Tensor, labels: Tensor) -> Tensor:
        self._check_fitted()
        features = check_features(features)
        labels = check_class_labels(labels, len(features))
        assert self.centroids is not None and self.radii is not None
        if features.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"features have {features.shape[1]} dimensions but {type(self).__name__} was fitted on "
                             f"{self.centroids.shape[1]}")
        if len(labels) and int(labels.max()) >= len(self.centroids):
            raise ValueError(f"labels must be < {len(self.centroids)} (the classes {type(self).__name__} was fitted "
                             f"on), got {int(labels.max())}")
        dev = self.centroids.device
        labels = labels.to(dev)
        d = self.distances(features.to(dev, self.centroids.dtype), labels)
        r = self.radii[labels]
        inf = torch.full_like(d, float("inf"))
        return torch.where(r > 0, d / r.clamp_min(torch.finfo(r.dtype).tiny), torch.where(d > 0, inf, torch.zeros_like(d)))

    def hparams(self) -> Dict[str, Any]:
        return {**super().hparams(), "percentile": self.percentile, "radii": self.given}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        for key in self._state_keys():
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in self._state_keys():
            if key in state:
                setattr(self, key, torch.as_tensor(state[key]))

    def _state_keys(self) -> Tuple[str, ...]:
        return ("centroids", "radii")
