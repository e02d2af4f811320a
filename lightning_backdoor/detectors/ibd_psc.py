"""IBD-PSC: parameter-oriented scaling consistency (white-box, data-limited).

Hou et al., "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling Consistency",
ICML 2024. Amplifying the γ and β of a model's last BatchNorm2d layers by ω makes benign
predictions lose confidence while poisoned inputs keep predicting the target with high
confidence (docs/methods.md §3).

    det = IBDPSC().fit(model, benign_loader)   # adaptive choice of k on ≈100 benign samples
    scores = det.score(model, x)               # mean amplified confidence in the original label
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..validation import check_above_one, check_choice, check_positive_int, check_probability, warn_ignored
from ..utils import model_device, preserved_rng
from .base import DETECTORS, Detector, collect_benign
from .functional.ibd_psc import LAYER_RANGES, OMEGA_WHY, BNLayerCache, amplified_layer_counts, fit_k, ibd_psc_score


#: Fewer benign samples than this for the adaptive choice of k gives a warning.
MIN_FIT_SAMPLES = 50


@DETECTORS.register("ibd_psc")
class IBDPSC(Detector):
    """IBD-PSC input-level backdoor detector (white-box, data-limited; docs/methods.md §3).

    ``score(x) = (1/n) Σ_{i=k}^{k+n-1} softmax(F̂_i^ω(x))[y']`` where ``F̂_i^ω`` multiplies γ and β of
    the last ``i`` BatchNorm2d layers (in forward-execution order) by ω and ``y'`` is the original
    model's prediction. Scores lie in ``[0, 1]``; higher means more likely poisoned.

    ``fit`` with ``k=None`` runs the paper's adaptive layer selection (Algorithm 1) on at most
    ``max_fit_samples`` benign samples: the first ``k`` whose benign error rate under amplification
    exceeds ``xi``. It raises a ``ValueError`` listing the error rates when no ``k`` does (typical
    for plain Conv-BN-ReLU stacks). With a fixed ``k``, ``fit`` only checks ``k`` against the
    model's number of BN layers and scoring works without it.

    Scoring runs the model in eval mode without gradients and restores its mode; parameters,
    buffers and the global RNG are untouched. Layers before the first amplified BN are computed
    once per batch (fx-traced split, cached per model through a weak reference); untraceable
    models fall back to full forward passes with a one-time warning.

    Args:
        omega: amplification factor ω (> 0), paper default 1.5.
        n: number of amplified models averaged, default 5.
        xi: error-rate threshold ξ for the adaptive choice of ``k``, default 0.6.
        threshold: decision threshold ``T`` for ``predict`` (``score > T``), default 0.9.
        k: first amplified-layer count, or None to select it in ``fit``.
        layer_range: ``"paper"`` (``k…k+n-1``) or ``"published"`` (the public code's ``k+1…k+n``).
        max_fit_samples: benign samples used by ``fit``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
        ...                     nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        >>> IBDPSC(k=1, n=2).score(net, torch.rand(5, 3, 8, 8)).shape
        torch.Size([5])
    """

    name = "ibd_psc"
    threat_model = "white-box, data-limited"

    def __init__(
        self,
        omega: float = 1.5,
        n: int = 5,
        xi: float = 0.6,
        threshold: float = 0.9,
        k: Optional[int] = None,
        layer_range: str = "paper",
        max_fit_samples: int = 100,
    ) -> None:
        super().__init__(threshold)
        self.omega = check_above_one(omega, "omega", OMEGA_WHY)
        self.n = check_positive_int(n, "n")
        self.xi = check_probability(xi, "xi")
        if k is not None:
            check_positive_int(k, "k")
        self.layer_range = check_choice(layer_range, "layer_range", LAYER_RANGES)
        self.max_fit_samples = check_positive_int(max_fit_samples, "max_fit_samples")
        if k is not None:
            for arg, value, default in (("xi", xi, 0.6), ("max_fit_samples", max_fit_samples, 100)):
                if value != default:
                    warn_ignored("IBDPSC", arg, value, f"it only matters for the adaptive choice of k (k=None), "
                                 f"and k={k} is fixed")
        self._k_arg = k
        self.k: Optional[int] = k
        self.requires_fit = k is None
        self.etas: List[float] = []
        self.num_bn_layers: Optional[int] = None
        self._layers = BNLayerCache()  # BN order and shared-prefix runners per model (weak, one entry)

    # -- interface -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, benign: Any) -> "IBDPSC":
        """Select ``k`` on benign data (``k=None``) or check the fixed ``k`` against the model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        device = model_device(model)
        x, y = collect_benign(benign, device, self.max_fit_samples)
        if self._k_arg is None and len(x) < MIN_FIT_SAMPLES:
            warnings.warn(f"IBDPSC.fit selects k on {len(x)} benign samples; the error rates eta_k are noisy on so few "
                          f"(the paper uses about 100): raise fit_samples / defense_size", UserWarning, stacklevel=2)
        with preserved_rng(device):
            layers = self._layers.layers(model, x)
            self.k, self.etas = fit_k(model, x, y, self._k_arg, omega=self.omega, xi=self.xi, layers=layers)
        self.num_bn_layers = len(layers)
        self.fitted = True
        return self

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """PSC of each input (float ``Tensor[N]``, in ``[0, 1]``); higher = more likely poisoned."""
        if self.k is None:
            raise RuntimeError(
                "IBDPSC(k=None) selects k on benign data: call det.fit(model, benign) before scoring, "
                "or construct it with a fixed k"
            )
        x = self._check_input(model, x)
        if len(x) == 0:
            return torch.empty(0, device=x.device)
        with preserved_rng(x.device):
            layers = self._layers.layers(model, x)
            counts = amplified_layer_counts(self.k, self.n, len(layers), self.layer_range, warn=False)
            runner = self._layers.runner(model, layers[len(layers) - counts[-1]], x, self.omega)
            return ibd_psc_score(
                model,
                x,
                self.k,
                omega=self.omega,
                n=self.n,
                layer_range=self.layer_range,
                layers=layers,
                shared_prefix=runner is not None,
                runner=runner,
            )

    def hparams(self) -> Dict[str, Any]:
        return {
            "omega": self.omega,
            "n": self.n,
            "xi": self.xi,
            "threshold": self.threshold,
            "k": self.k,
            "adaptive_k": self._k_arg is None,
            "layer_range": self.layer_range,
            "max_fit_samples": self.max_fit_samples,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "fitted": self.fitted,
            "k": self.k,
            "etas": list(self.etas),
            "num_bn_layers": self.num_bn_layers,
            "omega": self.omega,
            "layer_range": self.layer_range,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, mine in (("omega", self.omega), ("layer_range", self.layer_range)):
            if key in state and state[key] != mine:
                raise ValueError(f"state was saved with {key}={state[key]!r} but this IBDPSC has {key}={mine!r}")
        super().load_state_dict(state)
        k = state.get("k", self._k_arg)
        self.k = None if k is None else int(k)
        self.etas = [float(e) for e in state.get("etas", [])]
        num = state.get("num_bn_layers")
        self.num_bn_layers = None if num is None else int(num)
