"""Adaptive attacks against IBD-PSC (docs/methods.md, IBD-PSC, "adaptive attacks")."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detectors.base import collect_benign
from ..detectors.functional.ibd_psc import OMEGA_WHY, BNLayerCache, amplified_forward, check_k, fit_k
from ..utils import evaluating, model_device, preserved_rng
from ..validation import check_above_one, check_positive_int, check_probability, warn_ignored
from .base import LOSSES, LossTerm

IBD_PSC_DESIGNS = (1, 2)


@LOSSES.register("ibd_psc_adaptive")
class IBDPSCAdaptiveLoss(LossTerm):
    """The two adaptive-attack designs against IBD-PSC; the attacker knows ω and ``k``.

    Hou et al., "IBD-PSC", ICML 2024, section on adaptive attacks. With ``F̂_k^ω`` the model with γ
    and β of its last ``k`` BatchNorm2d layers multiplied by ω, and ``N`` the batch size:

    - Design 1 (keep benign samples correct under amplification):
      ``L = α·L_bd + (1−α)·(1/N)·Σ_{benign i} CE(F̂_k^ω(x_i), y_i)``, α ∈ {0.2, 0.5, 0.9, 0.99} in the paper.
    - Design 2 (push poisoned samples off the target under amplification, soft labels):
      ``L = α'·L_bd + (1−α')·(1/N)·Σ_{poisoned j} CE(F̂_k^ω(x_j), ŷ)`` with ``ŷ_t = 1−ζ`` and
      ``ŷ_c = ζ/(K−1)`` otherwise; α' ∈ {0.01, 0.1, 0.5} in the paper.

    ``L_bd`` is the mean CE over the batch. The papers sum each term over samples; dividing every
    sum by the same ``N`` (not by the number of benign or poisoned samples in the batch) keeps the
    paper's objective up to one constant factor, so α and α' weigh the terms as in the paper.
    ``main_weight`` is α; the term returns the ``(1−α)·(1/N)·Σ CE`` part, or None (``skipped += 1``)
    when the batch holds no benign (design 1) or no poisoned (design 2) sample.

    The amplified pass is **the function the detector scores**: the model in eval mode, every
    BatchNorm normalising with its running statistics, whatever the caller's mode. (A train-mode pass
    would let each BN re-normalise the sub-batch with its own statistics, which cancels ω on every
    amplified BN followed by a conv and another BN, so the term would barely see the amplification.)
    γ and β are scaled inside the autograd graph (``torch.func.functional_call``), so gradients reach
    the original BN parameters and every other weight; the model's modes, parameters and buffers are
    left as they were (running statistics are updated only by the main forward pass).

    ``k="auto"`` selects ``k`` like the defender (Algorithm 1 on ``max_fit_samples`` benign samples,
    a seeded random sample of the given data, with threshold ``xi``): ``fit(model, benign)`` runs
    before training (``BackdoorClassifier`` does it at the start of ``fit`` on the data module's
    held-apart benign set). The choice is kept in ``k`` / ``etas`` and in the module's state dict
    (extra state), so a resumed run keeps it (``fitted`` is restored with it) instead of selecting
    again on the partly adapted model.

    Args:
        design: 1 or 2.
        alpha: weight α of the vanilla loss, in ``[0, 1)`` (α = 1 would give the adaptive term weight 0:
            vanilla training).
        omega: amplification factor ω (> 0; > 1 to amplify).
        k: number of last BN layers amplified, or ``"auto"``.
        zeta: soft-label mass ζ moved off the target (design 2), in ``[0, 1)``.
        num_classes: K for the soft labels; default: the model's output width.
        xi: error-rate threshold for ``k="auto"``.
        max_fit_samples: benign samples used by ``fit`` for ``k="auto"``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
        >>> term = IBDPSCAdaptiveLoss(design=1, alpha=0.5, k=1)
        >>> x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
        >>> term(net, x, y, torch.tensor([True, False, False, False]), y, 0).shape
        torch.Size([])
    """

    name = "ibd_psc_adaptive"

    def __init__(
        self,
        design: int = 1,
        alpha: float = 0.5,
        omega: float = 1.5,
        k: Union[int, str] = "auto",
        zeta: float = 0.1,
        num_classes: Optional[int] = None,
        xi: float = 0.6,
        max_fit_samples: int = 100,
    ) -> None:
        super().__init__()
        if isinstance(design, bool) or design not in IBD_PSC_DESIGNS:
            raise ValueError(f"design must be one of {list(IBD_PSC_DESIGNS)}, got {design!r}")
        self.design = int(design)
        self.alpha = check_probability(alpha, "alpha", high_open=True)
        self.omega = check_above_one(omega, "omega", OMEGA_WHY)
        self.zeta = check_probability(zeta, "zeta", high_open=True)
        self.xi = check_probability(xi, "xi")
        self.max_fit_samples = check_positive_int(max_fit_samples, "max_fit_samples")
        if k != "auto":
            if isinstance(k, str):
                raise ValueError(f"k must be a positive int or 'auto', got {k!r}")
            check_positive_int(k, "k")
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes")
            if num_classes < 2:
                raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        if self.design == 1:
            for arg, value, default in (("zeta", zeta, 0.1), ("num_classes", num_classes, None)):
                if value != default:
                    warn_ignored("IBDPSCAdaptiveLoss", arg, value, "it sets the soft labels of design 2; design=1 uses "
                                 "the true labels")
        if k != "auto":
            for arg, value, default in (("xi", xi, 0.6), ("max_fit_samples", max_fit_samples, 100)):
                if value != default:
                    warn_ignored("IBDPSCAdaptiveLoss", arg, value, f"it only matters for k='auto', and k={k} is fixed")
        self.main_weight = self.alpha
        self.requires_fit = k == "auto"
        self.fitted = k != "auto"
        self._k_arg: Optional[int] = None if k == "auto" else int(k)
        self.k: Optional[int] = self._k_arg
        self.etas: List[float] = []
        self._layers = BNLayerCache()

    def fit(self, model: nn.Module, benign: Any) -> "IBDPSCAdaptiveLoss":
        """``k="auto"``: run the layer selection on benign data. Fixed ``k``: check it against the model."""
        device = model_device(model)
        x, y = collect_benign(benign, device, self.max_fit_samples)
        with preserved_rng(device):
            layers = self._layers.layers(model, x)
            self.k, self.etas = fit_k(model, x, y, self._k_arg, omega=self.omega, xi=self.xi, layers=layers)
        self.fitted = True
        return self

    def forward(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        poisoned: Tensor,
        original_y: Tensor,
        target: Union[int, Tensor, None] = None,
        logits: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        y, poisoned, original_y = self._check_batch(x, y, poisoned, original_y)
        if self.k is None:
            raise RuntimeError("IBDPSCAdaptiveLoss(k='auto') must be fitted first: call term.fit(model, benign)")
        mask = ~poisoned if self.design == 1 else poisoned
        xs = x[mask]
        if len(xs) == 0:
            self._skip()
            return None
        layers = self._layers.layers(model, x)
        check_k(self.k, len(layers))
        with evaluating(model, grad=True):  # the detector's function: BN on running statistics
            out = amplified_forward(model, xs, layers[len(layers) - self.k :], self.omega)
        if self.design == 1:
            labels: Tensor = y[mask].to(out.device)
        else:
            labels = self._soft_labels(out, self._targets(target, y, mask))
        ce_sum = F.cross_entropy(out, labels, reduction="sum")
        return (1.0 - self.alpha) * ce_sum / len(x)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"k": self.k, "etas": list(self.etas), "fitted": bool(self.fitted)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        k = state.get("k")
        self.k = None if k is None else int(k)
        self.etas = [float(e) for e in state.get("etas", [])]
        # a restored k stands: a resumed run must not re-select it on the partly adapted model
        self.fitted = bool(state.get("fitted", self.k is not None)) and self.k is not None

    def extra_repr(self) -> str:
        return (
            f"design={self.design}, alpha={self.alpha}, omega={self.omega}, k={self.k if self.k is not None else 'auto'}, "
            f"zeta={self.zeta}, num_classes={self.num_classes}"
        )

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _targets(target: Union[int, Tensor, None], y: Tensor, mask: Tensor) -> Tensor:
        if target is None:
            return y[mask]
        if isinstance(target, Tensor):
            if target.dim() == 0:
                return target.long().expand(int(mask.sum())).to(y.device)
            if target.shape != y.shape:
                raise ValueError(f"target must be an int or a Tensor of shape {tuple(y.shape)}, got shape {tuple(target.shape)}")
            return target.long().to(y.device)[mask]
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"target must be an int class index or a Tensor of labels, got {target!r}")
        return torch.full((int(mask.sum()),), target, dtype=torch.long, device=y.device)

    def _soft_labels(self, out: Tensor, targets: Tensor) -> Tensor:
        num_classes = out.shape[-1]
        if self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(f"num_classes={self.num_classes} but the model outputs {num_classes} logits")
        if num_classes < 2:
            raise ValueError(f"design 2 needs at least 2 classes, the model outputs {num_classes} logits")
        if bool(((targets < 0) | (targets >= num_classes)).any()):
            raise ValueError(f"target labels must lie in [0, {num_classes - 1}], got {targets.tolist()}")
        soft = torch.full((len(targets), num_classes), self.zeta / (num_classes - 1), dtype=out.dtype, device=out.device)
        return soft.scatter_(1, targets.to(out.device).view(-1, 1), 1.0 - self.zeta)
