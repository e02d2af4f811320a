"""The feasible set ``F`` of the sphere + slab defence for two classes, and its exact worst point (torch only).

``F = ∪_y F_y × {y}``, ``F_y = {x : ‖x − μ_y‖₂ ≤ r_y, |⟨x − μ_y, v_y⟩| ≤ s_y}`` with the slab
direction ``v_y = μ_y − μ_{−y}`` (docs/methods.md §6, docs/certified.md).

**The inner maximisation is solved in closed form.** For a margin loss that decreases in the
margin, the feasible point of class ``y`` with the largest loss at ``θ = (w, b)`` minimises the
linear function ``y·⟨w, x⟩`` over ``F_y``. Writing ``x = μ_y + u`` and ``c = y·w``, this is
``min cᵀu`` s.t. ``‖u‖ ≤ r``, ``|⟨v̂, u⟩| ≤ t`` with ``t = s/‖v‖``. Only the components of ``u`` along
``v̂`` and along ``c⊥`` (the part of ``c`` orthogonal to ``v̂``) matter, so the problem lives in
``span(c, v)`` (the span of ``θ``, the centroid and the slab direction, in the paper's words).
In those coordinates ``u = a·v̂ + β·ĉ⊥`` and for fixed ``a`` the best ``β`` is ``−√(r² − a²)``, leaving
the convex one-dimensional ``g(a) = α·a − ‖c⊥‖·√(r² − a²)`` on ``|a| ≤ min(t, r)`` (``α = ⟨c, v̂⟩``). Its
unconstrained minimiser is the ball's answer ``a = −r·α/‖c‖``; when that violates the slab, the
minimiser is the nearer end, ``a = −sign(α)·t``. No solver is involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..sanitizers.functional import (check_class_labels, check_features, check_percentile, class_centroids,
                                     percentile_radii, rest_centroids, slab_directions, slab_distances,
                                     sphere_distances)

__all__ = ["FeasibleSet", "check_binary_labels", "feasible_set", "min_linear_ball_slab"]


def check_binary_labels(labels: Tensor, n: int, name: str = "labels") -> Tensor:
    """Class indices in ``{0, 1}`` (class 1 is the ``+1`` side of the linear classifier)."""
    labels = check_class_labels(labels, n, name)
    if n and int(labels.max()) > 1:
        raise ValueError(f"{name} must be binary class indices in {{0, 1}} (the certificate is for a binary linear "
                         f"classifier), got labels up to {int(labels.max())}")
    return labels


@dataclass
class FeasibleSet:
    """Sphere ∩ slab per class (two classes).

    Attributes:
        centroids: ``[2, d]`` class centroids ``μ_y``.
        radii: ``[2]`` sphere radii ``r_y``.
        directions: ``[2, d]`` slab directions ``v_y = μ_y − μ_{−y}``.
        slab_radii: ``[2]`` slab radii ``s_y`` (``inf``: sphere only).
    """

    centroids: Tensor
    radii: Tensor
    directions: Tensor
    slab_radii: Tensor

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float64) -> "FeasibleSet":
        return FeasibleSet(*(t.to(device, dtype) for t in (self.centroids, self.radii, self.directions, self.slab_radii)))

    def contains(self, x: Tensor, y: Tensor, tol: float = 1e-6) -> Tensor:
        """bool ``[N]``: ``(x_i, y_i) ∈ F`` up to a relative tolerance ``tol``."""
        x = check_features(x, "x").to(self.centroids.dtype)
        y = check_binary_labels(y, len(x), "y").to(x.device)
        inside_sphere = sphere_distances(x, y, self.centroids) <= self.radii[y] * (1 + tol) + tol
        inside_slab = slab_distances(x, y, self.centroids, self.directions) <= self.slab_radii[y] * (1 + tol) + tol
        return inside_sphere & inside_slab

    def worst_points(self, w: Tensor) -> Tensor:
        """``[2, d]``: for each class ``y``, the point of ``F_y`` with the smallest ``sign_y·⟨w, x⟩`` (``sign_0 = −1``)."""
        out = []
        for k, sign in ((0, -1.0), (1, 1.0)):
            u = min_linear_ball_slab(sign * w, self.radii[k], self.directions[k], self.slab_radii[k])
            out.append(self.centroids[k] + u)
        return torch.stack(out)

    @classmethod
    def from_sanitizer(cls, sanitizer) -> "FeasibleSet":
        """The feasible set of a fitted two-class :class:`~lightning_backdoor.sanitizers.SphereSlab` or ``Sphere``."""
        from ..sanitizers import Sphere, SphereSlab

        if not isinstance(sanitizer, (Sphere, SphereSlab)) or not sanitizer.fitted:
            raise TypeError("from_sanitizer needs a fitted Sphere or SphereSlab sanitiser (the set must be bounded)")
        if len(sanitizer.centroids) != 2:
            raise ValueError(f"the certificate is for two classes; the sanitiser was fitted on {len(sanitizer.centroids)}")
        mu = sanitizer.centroids.double()
        if isinstance(sanitizer, SphereSlab):
            return cls(mu, sanitizer.radii.double(), sanitizer.directions.double(), sanitizer.slab_radii.double())
        inf = torch.full((2,), math.inf, dtype=torch.float64, device=mu.device)
        return cls(mu, sanitizer.radii.double(), mu - mu.flip(0), inf)


def feasible_set(features: Tensor, labels: Tensor, percentile: float = 70.0, *, slab: bool = True,
                 slab_percentile: Optional[float] = None) -> FeasibleSet:
    """Sphere (and slab) of each of two classes, estimated from ``(features, labels)`` (float64).

    Centroids are the class means; ``r_y`` (and ``s_y``) the ``percentile`` of the class's sphere
    (slab) distances, as the sanitisers compute them (:mod:`lightning_backdoor.sanitizers.functional`).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0]])
        >>> fs = feasible_set(x, torch.tensor([0, 0, 1, 1]), percentile=100)
        >>> fs.radii.tolist(), fs.slab_radii.tolist()
        ([1.0, 1.0], [10.0, 10.0])
    """
    features = check_features(features).double()
    labels = check_binary_labels(labels, len(features)).to(features.device)
    percentile = check_percentile(percentile)
    mu = class_centroids(features, labels, 2)
    directions = slab_directions(mu, rest_centroids(features, labels, 2))
    radii = percentile_radii(sphere_distances(features, labels, mu), labels, 2, percentile)
    if slab:
        q = percentile if slab_percentile is None else check_percentile(slab_percentile, "slab_percentile")
        slab_radii = percentile_radii(slab_distances(features, labels, mu, directions), labels, 2, q)
    else:
        slab_radii = torch.full((2,), math.inf, dtype=torch.float64, device=features.device)
    return FeasibleSet(mu, radii, directions, slab_radii)


def min_linear_ball_slab(c: Tensor, r: Tensor | float, v: Tensor, s: Tensor | float) -> Tensor:
    """The exact minimiser ``u`` of ``⟨c, u⟩`` over ``{‖u‖₂ ≤ r, |⟨v, u⟩| ≤ s}`` (closed form; module docstring).

    ``s = inf`` (or ``v = 0``) means no slab. Returns ``0`` when ``c = 0`` (every point is optimal).

    Example:
        >>> u = min_linear_ball_slab(torch.tensor([1.0, 1.0]), 1.0, torch.tensor([1.0, 0.0]), 0.5)
        >>> [round(t, 4) for t in u.tolist()]   # the slab caps the first coordinate at -0.5
        [-0.5, -0.866]
    """
    r = torch.as_tensor(r, dtype=c.dtype, device=c.device)
    s = torch.as_tensor(s, dtype=c.dtype, device=c.device)
    cn = c.norm()
    if float(cn) == 0.0 or float(r) == 0.0:
        return torch.zeros_like(c)
    u_ball = -r * c / cn
    vn = v.norm()
    if not bool(torch.isfinite(s)) or float(vn) == 0.0:
        return u_ball
    t = s / vn                      # the slab bounds the coordinate along v̂ by t
    vh = v / vn
    alpha = torch.dot(c, vh)
    if float((u_ball @ vh).abs()) <= float(t):
        return u_ball
    a = -torch.sign(alpha) * t      # |α| > 0 here, and t < r
    perp = c - alpha * vh
    pn = perp.norm()
    if float(pn) <= 1e-12 * float(cn):
        return a * vh
    beta = -torch.sqrt((r * r - t * t).clamp_min(0))
    return a * vh + beta * perp / pn

