"""The sphere sanitiser: keep ``(x, y)`` when ``‖x − μ_y‖₂ ≤ r_y`` (Steinhardt, Koh & Liang, NeurIPS 2017).

docs/methods.md §6, docs/sanitizers.md.
"""

from __future__ import annotations

from torch import Tensor

from .base import SANITIZERS, CentroidSanitizer
from .functional import sphere_distances


@SANITIZERS.register("sphere")
class Sphere(CentroidSanitizer):
    """Removes training samples farther than ``r_y`` from the centroid ``μ_y`` of their (training) label.

    Threat model: the attacker adds or relabels a share of the training set; the defender knows the
    labels as given and, in oracle mode, holds a trusted clean set. Centroids come from that clean
    set (``mode="oracle"``) or from the training set being sanitised (``mode="data"``, weaker: the
    poisoned samples move the centroids and radii). Radii: the ``percentile`` (default 70) of the
    fitting samples' distances per class, or given.

    Score: ``‖x − μ_y‖₂ / r_y``; a sample is kept iff its score is ``<= 1``.

    Args: see :class:`~lightning_backdoor.sanitizers.base.CentroidSanitizer`.

    Example:
        >>> import torch
        >>> clean_x, clean_y = torch.randn(100, 5), torch.arange(100) % 2
        >>> x = torch.cat([torch.randn(10, 5), 10 + torch.randn(2, 5)]); y = torch.arange(12) % 2
        >>> keep, scores = Sphere(percentile=90).sanitize(x, y, clean=(clean_x, clean_y))
        >>> bool(keep[-2:].any())   # the two far-away samples are removed
        False
    """

    name = "sphere"

    def distances(self, features: Tensor, labels: Tensor) -> Tensor:
        assert self.centroids is not None
        return sphere_distances(features, labels, self.centroids)
