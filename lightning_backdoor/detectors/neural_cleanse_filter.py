"""Neural Cleanse's input filter: inputs that excite the reversed trigger's neurons are poisoned.

Wang et al., "Neural Cleanse", IEEE S&P 2019, Sec. VI-A (mitigation by filtering). White-box,
data-limited.

    det = NeuralCleanseFilter().fit(model, benign)   # reverse-engineers triggers (Neural Cleanse), ranks neurons
    scores = det.score(model, x)                     # mean activation of the top neurons; higher = poisoned
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..utils import model_device, model_dtype
from ..validation import check_bool, check_optional_real, check_probability, warn_ignored
from .base import DETECTORS, Detector, collect_benign, threshold_at_fpr


@DETECTORS.register("neural_cleanse_filter")
class NeuralCleanseFilter(Detector):
    """Neural Cleanse input filter (white-box, data-limited; docs/neural_cleanse.md).

    ``fit(model, benign)`` runs :class:`~lightning_backdoor.defenses.NeuralCleanse` on the benign
    data (with ``refit=False``, a ``cleanse`` that is already fitted is reused), takes the triggers
    of the flagged labels (the label with the smallest mask when none is flagged), and ranks the neurons of ``layer`` (default: the
    features entering the last ``nn.Linear``) by how much more those triggers excite them than
    clean images do. The score of an input is the mean activation of the top ``top_fraction`` of
    neurons (at least one); the threshold flags at most ``target_fpr`` of the benign fit images.

    Args:
        cleanse: a :class:`~lightning_backdoor.defenses.NeuralCleanse` (fitted or not; default: a new
            one with its defaults).
        layer: name of the submodule whose output holds the neurons (None: the last linear layer's input).
        top_fraction: share of the layer's neurons used (paper: the top 1%).
        threshold: decision threshold, or None to set it from ``target_fpr`` in ``fit``.
        target_fpr: benign false-positive rate when the threshold is set in ``fit`` (paper: 5%).
        refit: re-run Neural Cleanse at every ``fit`` (the detection callback refits detectors at each
            run, on the model as it is then); ``False`` reuses a fitted ``cleanse``.

    Example:
        >>> from lightning_backdoor.defenses import NeuralCleanse
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> det = NeuralCleanseFilter(NeuralCleanse(steps=5, batch_size=4))
        >>> det = det.fit(net, (torch.rand(12, 1, 4, 4), torch.arange(12) % 3))
        >>> det.score(net, torch.rand(2, 1, 4, 4)).shape
        torch.Size([2])
    """

    name = "neural_cleanse_filter"
    threat_model = "white-box, data-limited"
    requires_fit = True

    def __init__(
        self,
        cleanse: Any = None,
        layer: Optional[str] = None,
        top_fraction: float = 0.01,
        threshold: Optional[float] = None,
        target_fpr: float = 0.05,
        refit: bool = True,
    ) -> None:
        from ..defenses.neural_cleanse import NeuralCleanse

        if cleanse is None:
            cleanse = NeuralCleanse()
        if not isinstance(cleanse, NeuralCleanse):
            raise TypeError(f"cleanse must be a NeuralCleanse instance or None, got {type(cleanse).__name__}")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a submodule name (str) or None, got {layer!r}")
        self.cleanse = cleanse
        self.refit = check_bool(refit, "refit")
        self.layer = layer
        self.top_fraction = check_probability(top_fraction, "top_fraction", low_open=True)
        self.target_fpr = check_probability(target_fpr, "target_fpr", high_open=True)
        self._threshold_arg = check_optional_real(threshold, "threshold")
        if threshold is not None and target_fpr != 0.05:
            warn_ignored("NeuralCleanseFilter", "target_fpr", target_fpr, f"threshold={threshold} is given")
        super().__init__(math.nan if threshold is None else float(threshold))
        self.neurons: Optional[Tensor] = None
        self.suspects: Optional[Tensor] = None

    def _resolve_layer(self, model: nn.Module) -> tuple:
        from ..defenses.functional.neural_cleanse import default_layer, find_layer

        if self.layer is None:
            return default_layer(model), True
        find_layer(model, self.layer)
        return self.layer, False

    def fit(self, model: nn.Module, benign: Any) -> "NeuralCleanseFilter":
        """Reverse-engineer triggers (if not yet), select the neurons and set the threshold."""
        from ..defenses.functional.neural_cleanse import layer_activations, rank_neurons

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        layer, use_input = self._resolve_layer(model)  # a wrong layer name fails before the optimisation
        if self.refit or not self.cleanse.fitted:
            self.cleanse.fit(model, benign)
        x, y = collect_benign(benign, device=model_device(model), max_samples=self.cleanse.max_samples,
                              seed=self.cleanse.seed)
        x = x.to(dtype=model_dtype(model))
        xt, _ = self.cleanse.stamp_suspects(x, y)
        act_c = layer_activations(model, x, layer, use_input=use_input)
        act_t = layer_activations(model, xt, layer, use_input=use_input)
        k = max(1, int(math.ceil(self.top_fraction * act_c.shape[1])))
        self.neurons = rank_neurons(act_c, act_t)[:k].cpu()
        self.suspects = torch.tensor(self.cleanse.suspect_labels(), dtype=torch.long)
        self.fitted = True
        if self._threshold_arg is None:
            self.threshold = threshold_at_fpr(self._from_acts(act_c), self.target_fpr)
        return self

    def _from_acts(self, acts: Tensor) -> Tensor:
        assert self.neurons is not None
        return acts[:, self.neurons.to(acts.device)].mean(dim=1)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Mean activation of the selected neurons for each input (higher = more likely poisoned)."""
        from ..defenses.functional.neural_cleanse import layer_activations

        self._check_fitted()
        x = self._check_input(model, x)
        layer, use_input = self._resolve_layer(model)
        return self._from_acts(layer_activations(model, x, layer, use_input=use_input))

    def hparams(self) -> Dict[str, Any]:
        return {"cleanse": self.cleanse.hparams(), "layer": self.layer, "top_fraction": self.top_fraction,
                "threshold": self._threshold_arg, "target_fpr": self.target_fpr, "refit": self.refit}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted, "threshold": self.threshold, "neurons": self.neurons,
                "suspects": self.suspects, "cleanse": self.cleanse.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        self.neurons, self.suspects = state.get("neurons"), state.get("suspects")
        if "cleanse" in state:
            self.cleanse.load_state_dict(state["cleanse"])
        if self.fitted and self.neurons is None:
            raise ValueError("a fitted NeuralCleanseFilter state must contain its selected 'neurons'")
