"""Sphere and slab together: the feasible set of the certified defence (Steinhardt, Koh & Liang, NeurIPS 2017).

docs/methods.md §6, docs/sanitizers.md, docs/certified.md.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import SANITIZERS, CentroidSanitizer
from .features import FeatureExtractor
from .functional import (check_class_labels, check_features, given_radii, percentile_radii, rest_centroids,
                         slab_directions, slab_distances, sphere_distances)


@SANITIZERS.register("sphere_slab")
class SphereSlab(CentroidSanitizer):
    """Keeps a sample only when it is inside both the sphere and the slab of its class.

    Both sets share the centroids (oracle or data-dependent) and the ``percentile``; each has its
    own radii (``radii`` for the sphere, ``slab_radii`` for the slab; given or from the percentile).
    This is the defence whose worst case :func:`lightning_backdoor.certified.certify` bounds.

    Score: ``max(‖x − μ_y‖₂ / r_y, |⟨x − μ_y, μ_y − μ_{−y}⟩| / s_y)``; kept iff ``<= 1``.

    Example:
        >>> import torch
        >>> clean_x, clean_y = torch.randn(200, 4), torch.arange(200) % 2
        >>> san = SphereSlab(percentile=100).fit(clean_x, clean_y)
        >>> bool(san.keep(clean_x, clean_y).all())   # the 100th percentile keeps every fitting sample
        True
    """

    name = "sphere_slab"
    directions: Optional[Tensor] = None
    slab_radii: Optional[Tensor] = None

    def __init__(self, mode: str = "oracle", percentile: float = 70.0,
                 radii: Optional[float | Sequence[float]] = None, slab_radii: Optional[float | Sequence[float]] = None,
                 features: Optional[FeatureExtractor] = None) -> None:
        super().__init__(mode, percentile, radii, features)
        if slab_radii is not None:
            given_radii(slab_radii, 1 if isinstance(slab_radii, (int, float)) else len(slab_radii), "slab_radii")
            slab_radii = float(slab_radii) if isinstance(slab_radii, (int, float)) else [float(r) for r in slab_radii]
        self.given_slab = slab_radii

    def fit(self, features: Tensor, labels: Tensor, num_classes: Optional[int] = None) -> "SphereSlab":
        super().fit(features, labels, num_classes)  # centroids, slab directions, sphere radii
        labels = check_class_labels(labels, len(features)).to(features.device)
        k = len(self.centroids)
        if self.given_slab is not None:
            self.slab_radii = given_radii(self.given_slab, k, "slab_radii").to(features.device, features.dtype)
        else:
            self.slab_radii = percentile_radii(self._slab(features, labels), labels, k, self.percentile)
        return self

    def _fit_geometry(self, features: Tensor, labels: Tensor, num_classes: int) -> None:
        assert self.centroids is not None
        self.directions = slab_directions(self.centroids, rest_centroids(features, labels, num_classes))

    def _slab(self, features: Tensor, labels: Tensor) -> Tensor:
        return slab_distances(features, labels, self.centroids, self.directions)

    def distances(self, features: Tensor, labels: Tensor) -> Tensor:
        """The sphere distance (compared with ``radii``); the slab part is added in :meth:`score`."""
        return sphere_distances(features, labels, self.centroids)

    def score(self, features: Tensor, labels: Tensor) -> Tensor:
        sphere = super().score(features, labels)
        features = check_features(features)
        labels = check_class_labels(labels, len(features)).to(self.centroids.device)
        d = self._slab(features.to(self.centroids.device, self.centroids.dtype), labels)
        s = self.slab_radii[labels]
        slab = torch.where(s > 0, d / s.clamp_min(torch.finfo(s.dtype).tiny),
                           torch.where(d > 0, torch.full_like(d, float("inf")), torch.zeros_like(d)))
        return torch.maximum(sphere, slab)

    def hparams(self) -> Dict[str, Any]:
        return {**super().hparams(), "slab_radii": self.given_slab}

    def _state_keys(self) -> Tuple[str, ...]:
        return ("centroids", "radii", "directions", "slab_radii")
