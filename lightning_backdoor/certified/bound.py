"""The certified upper bound on what any ε-fraction poisoner can do against sphere + slab (torch only).

Steinhardt, Koh & Liang, "Certified Defenses for Data Poisoning Attacks", NeurIPS 2017
(docs/methods.md §6, docs/certified.md). The defender trains a linear classifier
``θ = (w, b)``, ``‖θ‖₂ ≤ ρ``, with a convex margin loss ``ℓ`` on ``[x, 1]``, on the clean data
``D_c`` (``n`` points, kept in full: the paper's assumption that removing clean outliers does not
matter) plus the poisoned points that pass the feasible set ``F``. For any attack ``D_p ⊂ F`` of
``εn`` points and any ``θ`` in the ball,

    min_θ' (1/n)·L(θ'; D_c ∪ D_p)  ≤  (1/n)·L(θ; D_c) + ε·max_{(x, y) ∈ F} ℓ(θ; x, y),

so every ``θ`` gives an upper bound. Algorithm 1 (online learning) drives ``θ`` towards the
smallest such bound: at each step it takes the worst feasible point ``(x_t, y_t)`` for the current
``θ_t`` (exactly, :meth:`FeasibleSet.worst_points`), updates ``U* ← min(U*, L(θ_t; D_c)/n + ε·ℓ(θ_t; x_t, y_t))``
and takes a dual-averaging step on that objective: ``z ← z − g``, ``λ ← max(λ, ‖z‖/ρ)``,
``θ ← z/λ``, ``λ₀ = 1/η``. The last ``round(εn)`` selected points are the candidate attack; the
defender's loss after retraining on ``D_c`` plus that attack (same norm ball, warm-started at the
best ``θ``) is a lower bound that the attack actually reaches.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.cat([torch.randn(50, 2, generator=g) - 2, torch.randn(50, 2, generator=g) + 2])
    >>> y = torch.arange(100) // 50
    >>> cert = certify(x, y, feasible_set(x, y), epsilon=0.1, rho=2.0, steps=300)
    >>> cert.upper_bound >= cert.lower_bound
    True
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ..sanitizers.functional import check_features
from ..validation import check_positive_float, check_positive_int, check_probability
from .feasible import FeasibleSet, check_binary_labels, feasible_set
from .losses import MarginLoss, get_convex_loss, get_loss

__all__ = ["Certificate", "bound_curve", "certify", "certify_data_dependent", "evaluate_linear", "train_linear"]


@dataclass
class Certificate:
    """The output of :func:`certify` at one ``ε``.

    Attributes:
        epsilon, rho, loss: the setting.
        upper_bound: ``U*``, the certified bound on the defender's training loss
            ``(1/n)·L(θ̂; D_c ∪ D_p)`` over every attack ``D_p ⊂ F`` of ``εn`` points.
        theta: the ``θ`` (``[d + 1]``, bias last) attaining ``U*``.
        attack_x, attack_y: the candidate attack (``round(εn)`` points, class indices).
        lower_bound: the defender's loss after retraining on ``D_c`` plus the candidate attack
            (what the attack reaches; ``<= upper_bound``).
        attacked_theta: the retrained ``θ̂``.
        clean_loss: ``L(θ̂; D_c)/n`` of the retrained model.
        clean_losses, worst_losses: per iterate ``t``, ``L(θ_t; D_c)/n`` and ``max_F ℓ(θ_t)``: each
            iterate bounds every ``ε'`` by ``clean + ε'·worst`` (:func:`bound_curve`).
        feasible: the feasible set used.
        attack_kept: how many candidate points pass the defender's set (all, except for
            :func:`certify_data_dependent`).
        timings: seconds spent on the bound (Algorithm 1, ``"bound_s"``) and on retraining with the
            candidate attack (``"attack_s"``).
    """

    epsilon: float
    rho: float
    loss: str
    upper_bound: float
    theta: Tensor
    attack_x: Tensor
    attack_y: Tensor
    lower_bound: float
    attacked_theta: Tensor
    clean_loss: float
    clean_losses: Tensor
    worst_losses: Tensor
    feasible: FeasibleSet
    attack_kept: int
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)

    def summary(self) -> Dict[str, float]:
        """Plain numbers for tables and logs."""
        return {"epsilon": self.epsilon, "upper_bound": self.upper_bound, "lower_bound": self.lower_bound,
                "clean_loss": self.clean_loss, "attack_points": int(len(self.attack_x)), "attack_kept": self.attack_kept}


def _augment(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


def _signs(y: Tensor, dtype: torch.dtype) -> Tensor:
    return y.to(dtype) * 2 - 1


def _project(theta: Tensor, rho: float) -> Tensor:
    n = float(theta.norm())
    return theta * (rho / n) if n > rho else theta


def _objective(theta: Tensor, xa: Tensor, s: Tensor, w: Tensor, loss: MarginLoss):
    m = s * (xa @ theta)
    value = (w * loss.value(m)).sum()
    grad = xa.t() @ (w * s * loss.grad(m))
    return value, grad


def _check_common(x: Tensor, y: Tensor, rho: float, name: str = "clean"):
    x = check_features(x, f"{name} features").double()
    y = check_binary_labels(y, len(x), f"{name} labels").to(x.device)
    if len(x) == 0:
        raise ValueError(f"{name} features are empty")
    return x, y, check_positive_float(rho, "rho")


def train_linear(x: Tensor, y: Tensor, rho: float, *, loss: str | MarginLoss = "hinge", weights: Optional[Tensor] = None,
                 steps: int = 1500, init: Optional[Tensor] = None, smoothing: Sequence[float] = (0.1, 0.03, 0.01)) -> Tensor:
    """``argmin_{‖θ‖₂ ≤ ρ} Σ_i weights_i·ℓ(y_i·⟨θ, [x_i, 1]⟩)`` (``weights`` default to ``1/N``).

    Accelerated projected gradient (FISTA) on a smooth surrogate of the loss — for the hinge, the
    hinge with its kink rounded over a width ``mu``, for ``mu`` in ``smoothing`` in turn (warm
    starts; ``steps`` split evenly); the logistic loss is smooth and used as it is. The iterate
    with the smallest *true* objective is returned, never worse than ``init``.
    """
    x, y, rho = _check_common(x, y, rho, "training")
    loss = get_loss(loss)
    if loss.smooth is None:
        raise ValueError(f"loss {loss.name!r} has no smooth surrogate to train with; use 'hinge' or 'logistic'")
    steps = check_positive_int(steps, "steps")
    xa, s = _augment(x), _signs(y, x.dtype)
    w = torch.full((len(x),), 1.0 / len(x), dtype=x.dtype, device=x.device) if weights is None else \
        torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    a = s[:, None] * xa                                         # margins are a @ θ
    scale = float((w * (a * a).sum(1)).sum())
    theta = torch.zeros(xa.shape[1], dtype=x.dtype, device=x.device) if init is None else \
        _project(init.detach().to(x.device, x.dtype).clone(), rho)
    best, best_value = theta.clone(), float((w * loss.value(a @ theta)).sum())
    mus = list(smoothing) if loss.name == "hinge" else [0.0]
    per_stage = max(1, steps // len(mus))
    for mu in mus:
        _, curvature = loss.smooth(a[:1] @ theta, mu)
        step = 1.0 / max(scale * curvature, 1e-12)
        prev, ahead, t_k = theta, theta.clone(), 1.0
        for _ in range(per_stage):
            grad, _ = loss.smooth(a @ ahead, mu)
            theta = _project(ahead - step * (a.t() @ (w * grad)), rho)
            value = float((w * loss.value(a @ theta)).sum())
            if value < best_value:
                best, best_value = theta.clone(), value
            t_next = (1 + math.sqrt(1 + 4 * t_k * t_k)) / 2
            ahead = theta + ((t_k - 1) / t_next) * (theta - prev)
            prev, t_k = theta, t_next
        theta = best.clone()
    return best


def evaluate_linear(theta: Tensor, x: Tensor, y: Tensor, loss: str | MarginLoss = "hinge") -> Dict[str, float]:
    """Mean ``loss`` and classification error of the linear classifier ``θ`` on ``(x, y)``."""
    x = check_features(x).double()
    y = check_binary_labels(y, len(x)).to(x.device)
    m = _signs(y, x.dtype) * (_augment(x) @ theta.to(x.device, x.dtype))
    return {"loss": float(get_loss(loss).value(m).mean()), "error": float((m <= 0).double().mean())}


def certify(clean_x: Tensor, clean_y: Tensor, feasible: FeasibleSet, epsilon: float, rho: float, *,
            loss: str | MarginLoss = "hinge", steps: int = 2000, eta: Optional[float] = None,
            retrain_steps: int = 1500) -> Certificate:
    """Algorithm 1: the upper bound ``U*``, the candidate attack, and the loss that attack reaches.

    Args:
        clean_x, clean_y: the clean training data ``D_c`` (``[n, d]`` features, labels in ``{0, 1}``).
        feasible: the defender's feasible set (:func:`~lightning_backdoor.certified.feasible_set`).
        epsilon: poisoned points as a share of ``n``, in ``[0, 1)``.
        rho: radius of the parameter ball ``‖θ‖₂ ≤ ρ`` (bias included), ``> 0``.
        loss: a convex margin loss, ``"hinge"`` (the paper's) or ``"logistic"``.
        steps: iterations of Algorithm 1.
        eta: the dual-averaging step (``λ₀ = 1/η``); default ``ρ/G`` with ``G`` a bound on the
            objective's gradient norm (for MNIST-1-7 pixels ≈ 0.1, the published code's value).
        retrain_steps: steps of the retraining on ``D_c ∪ D_p`` (:func:`train_linear`).

    Returns:
        a :class:`Certificate`.
    """
    clean_x, clean_y, rho = _check_common(clean_x, clean_y, rho)
    epsilon = check_probability(epsilon, "epsilon", high_open=True)
    loss = get_convex_loss(loss)
    steps = check_positive_int(steps, "steps")
    if not isinstance(feasible, FeasibleSet):
        raise TypeError(f"feasible must be a FeasibleSet (see feasible_set(...)), got {type(feasible).__name__}")
    if feasible.dim != clean_x.shape[1]:
        raise ValueError(f"the feasible set has {feasible.dim} dimensions but the clean features {clean_x.shape[1]}")
    fs = feasible.to(clean_x.device)
    n = len(clean_x)
    xa, s = _augment(clean_x), _signs(clean_y, clean_x.dtype)
    w_clean = torch.full((n,), 1.0 / n, dtype=xa.dtype, device=xa.device)
    far = (fs.centroids.norm(dim=1) + fs.radii).max()
    lipschitz = float(xa.norm(dim=1).mean() + epsilon * torch.sqrt(far ** 2 + 1))
    eta = rho / lipschitz if eta is None else check_positive_float(eta, "eta")

    started = time.perf_counter()
    z = torch.zeros(xa.shape[1], dtype=xa.dtype, device=xa.device)
    lam, theta = 1.0 / eta, torch.zeros_like(z)
    best_value, best_theta = math.inf, theta.clone()
    clean_losses, worst_losses, chosen_x, chosen_y = [], [], [], []
    signs = torch.tensor([-1.0, 1.0], dtype=xa.dtype, device=xa.device)
    for _ in range(steps):
        clean_value, clean_grad = _objective(theta, xa, s, w_clean, loss)
        points = fs.worst_points(theta[:-1])                 # [2, d]: the worst point of each class
        margins = signs * (points @ theta[:-1] + theta[-1])
        k = int(torch.argmax(loss.value(margins)))           # the class whose worst point hurts most
        worst = loss.value(margins[k])
        value = float(clean_value + epsilon * worst)
        clean_losses.append(float(clean_value))
        worst_losses.append(float(worst))
        chosen_x.append(points[k])
        chosen_y.append(k)
        if value < best_value:
            best_value, best_theta = value, theta.clone()
        grad = clean_grad + epsilon * loss.grad(margins[k]) * signs[k] * torch.cat([points[k], points.new_ones(1)])
        z = z - grad
        lam = max(lam, float(z.norm()) / rho)
        theta = z / lam

    bound_s = time.perf_counter() - started
    m = int(round(epsilon * n))
    if epsilon > 0:
        m = max(m, 1)
        picks = [(steps - m + i) % steps for i in range(m)] if m <= steps else [i % steps for i in range(m)]
        attack_x = torch.stack([chosen_x[i] for i in picks])
        attack_y = torch.tensor([chosen_y[i] for i in picks], dtype=torch.long, device=xa.device)
    else:
        attack_x = clean_x.new_zeros(0, clean_x.shape[1])
        attack_y = torch.zeros(0, dtype=torch.long, device=xa.device)
    started = time.perf_counter()
    lower, attacked, clean_after = _attack_loss(clean_x, clean_y, attack_x, attack_y, torch.ones(len(attack_x), dtype=torch.bool),
                                                epsilon, rho, loss, best_theta, retrain_steps)
    return Certificate(epsilon, rho, loss.name, best_value, best_theta, attack_x, attack_y, lower, attacked, clean_after,
                       torch.tensor(clean_losses, dtype=torch.float64), torch.tensor(worst_losses, dtype=torch.float64),
                       feasible, int(len(attack_x)), {"bound_s": bound_s, "attack_s": time.perf_counter() - started})


def _attack_loss(clean_x, clean_y, attack_x, attack_y, kept, epsilon, rho, loss, init, steps):
    """Retrain on ``D_c`` (weight ``1/n`` each) plus the kept attack points (``ε/m`` each); the defender's loss."""
    n, m = len(clean_x), len(attack_x)
    kept = kept.to(attack_x.device)
    x = torch.cat([clean_x, attack_x[kept]])
    y = torch.cat([clean_y, attack_y[kept]])
    weights = torch.cat([torch.full((n,), 1.0 / n, dtype=torch.float64),
                         torch.full((int(kept.sum()),), epsilon / max(m, 1), dtype=torch.float64)]).to(x.device)
    theta = train_linear(x, y, rho, loss=loss, weights=weights, steps=steps, init=init)
    xa, s = _augment(x), _signs(y, x.dtype)
    value, _ = _objective(theta, xa, s, weights, loss)
    clean_value, _ = _objective(theta, xa[:n], s[:n], weights[:n], loss)
    return float(value), theta, float(clean_value)


def bound_curve(certificates: Sequence[Certificate], epsilons: Optional[Sequence[float]] = None) -> Tensor:
    """``U*(ε)`` for every ``ε``, using the iterates of all the runs: ``min_t clean_t + ε·worst_t``.

    Every iterate ``θ_t`` of any run (same data, feasible set, ``ρ`` and loss) bounds every ``ε``,
    so the pooled bound is valid, at least as tight as each run's own ``U*`` and non-decreasing in
    ``ε`` (a minimum of non-decreasing functions).
    """
    if not certificates:
        raise ValueError("certificates is empty")
    eps = [c.epsilon for c in certificates] if epsilons is None else [check_probability(e, "epsilon", high_open=True)
                                                                       for e in epsilons]
    clean = torch.cat([c.clean_losses for c in certificates])
    worst = torch.cat([c.worst_losses for c in certificates])
    return torch.stack([(clean + e * worst).min() for e in eps])


def certify_data_dependent(clean_x: Tensor, clean_y: Tensor, epsilon: float, rho: float, *, percentile: float = 70.0,
                           slab: bool = True, rounds: int = 3, **kwargs) -> Certificate:
    """The data-dependent defence: centroids and radii re-estimated on ``D_c ∪ D_p`` (an estimate, not a certificate).

    Round 0 runs :func:`certify` against the set estimated on ``D_c``; each further round re-estimates
    the set on ``D_c`` plus the previous round's candidate attack (the attacker moves the centroids
    and widens the radii) and runs :func:`certify` again. The returned ``upper_bound`` is the last
    round's bound for a set that depends on one particular attack, so it certifies nothing; its
    ``lower_bound`` is the loss the last attack reaches when the defender estimates the set on
    ``D_c ∪ D_p`` itself (attack points outside that set are removed; ``attack_kept`` says how many
    pass). See docs/certified.md.
    """
    rounds = check_positive_int(rounds, "rounds")
    clean_x = check_features(clean_x, "clean features").double()
    clean_y = check_binary_labels(clean_y, len(clean_x), "clean labels").to(clean_x.device)
    fs = feasible_set(clean_x, clean_y, percentile, slab=slab)
    cert = certify(clean_x, clean_y, fs, epsilon, rho, **kwargs)
    for _ in range(rounds - 1):
        if len(cert.attack_x) == 0:
            break
        fs = feasible_set(torch.cat([clean_x, cert.attack_x]), torch.cat([clean_y, cert.attack_y]), percentile, slab=slab)
        cert = certify(clean_x, clean_y, fs, epsilon, rho, **kwargs)
    if len(cert.attack_x) == 0:
        return cert
    final = feasible_set(torch.cat([clean_x, cert.attack_x]), torch.cat([clean_y, cert.attack_y]), percentile, slab=slab)
    kept = final.contains(cert.attack_x, cert.attack_y)
    loss = get_convex_loss(kwargs.get("loss", "hinge"))
    lower, attacked, clean_after = _attack_loss(clean_x, clean_y, cert.attack_x, cert.attack_y, kept, cert.epsilon,
                                                cert.rho, loss, cert.theta, kwargs.get("retrain_steps", 1500))
    return dataclasses.replace(cert, lower_bound=lower, attacked_theta=attacked, clean_loss=clean_after,
                               feasible=final, attack_kept=int(kept.sum()))
