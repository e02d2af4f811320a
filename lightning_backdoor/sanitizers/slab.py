"""The slab sanitiser: keep ``(x, y)`` when ``|⟨x − μ_y, μ_y − μ_{−y}⟩| ≤ s_y`` (Steinhardt, Koh & Liang, NeurIPS 2017).

docs/methods.md §6, docs/sanitizers.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .base import SANITIZERS, CentroidSanitizer
from .functional import rest_centroids, slab_directions, slab_distances


@SANITIZERS.register("slab")
class Slab(CentroidSanitizer):
    """Removes training samples whose projection on the line between the class centroids is too far out.

    The slab of class ``y`` is ``|⟨x − μ_y, μ_y − μ_{−y}⟩| ≤ s_y``: only the component of ``x − μ_y``
    along the direction joining the centroids counts. Multi-class generalisation: ``μ_{−y}`` is the
    centroid of all fitting samples whose label is not ``y`` (for two classes, the other class's
    centroid). Centroids (oracle or data-dependent) and radii (percentile, default 70, or given)
    as for :class:`~lightning_backdoor.sanitizers.Sphere`.

    Score: ``|⟨x − μ_y, μ_y − μ_{−y}⟩| / s_y``; a sample is kept iff its score is ``<= 1``.

    Args: see :class:`~lightning_backdoor.sanitizers.base.CentroidSanitizer`.

    Example:
        >>> import torch
        >>> clean_x = torch.cat([torch.randn(50, 3) - 2, torch.randn(50, 3) + 2]); clean_y = torch.arange(100) // 50
        >>> san = Slab(percentile=95).fit(clean_x, clean_y)
        >>> san.keep(torch.tensor([[-2.0, -2.0, -2.0], [8.0, 8.0, 8.0]]), torch.tensor([0, 0])).tolist()
        [True, False]
    """

    name = "slab"
    directions: Optional[Tensor] = None  # μ_y − μ_{−y} per class, set by fit

    def _fit_geometry(self, features: Tensor, labels: Tensor, num_classes: int) -> None:
        assert self.centroids is not None
        self.directions = slab_directions(self.centroids, rest_centroids(features, labels, num_classes))

    def distances(self, features: Tensor, labels: Tensor) -> Tensor:
        assert self.centroids is not None and self.directions is not None
        return slab_distances(features, labels, self.centroids, self.directions)

    def _state_keys(self) -> Tuple[str, ...]:
        return ("centroids", "radii", "directions")
