"""BaDExpert: backdoor input detection with an extracted backdoor expert (white-box, data-limited).

Xie et al., "BaDExpert: Extracting Backdoor Functionality for Accurate Backdoor Input Detection", ICLR 2024.

    det = BaDExpert().fit(model, benign_loader)    # fine-tunes two copies; the model is never modified
    scores = det.score(model, x)                   # log B(ŷ|x) - log M'(ŷ|x)
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..utils import model_device, random_subset
from ..validation import (
    check_choice,
    check_non_negative_float,
    check_optional_real,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
)
from .base import DETECTORS, Detector, collect_benign, threshold_at_fpr
from .functional.badexpert import (
    BADEXPERT_RULES,
    WRONG_LABELS,
    accuracy_with,
    badexpert_score,
    finetune_copy,
    num_classes_of,
    trainable_parameters,
    wrong_labels,
)

#: Fewest benign fitting samples BaDExpert accepts (it fine-tunes on most and calibrates on the rest).
MIN_FIT_SAMPLES = 10


@DETECTORS.register("badexpert")
class BaDExpert(Detector):
    """BaDExpert detector (white-box, data-limited; docs/methods.md §4).

    ``fit(model, benign)`` takes at most ``max_fit_samples`` benign samples (a seeded random sample),
    holds out ``calibration_fraction`` of them, and on the rest fine-tunes two deep copies of the model
    (SGD with momentum, train mode; the user's model is never modified):

    - the backdoor expert ``B``: ``expert_epochs`` at ``expert_lr`` on the samples with deliberately
      wrong labels (``(y + 1) mod K``, or random other classes with ``wrong_labels="random"``);
    - the auxiliary model ``M'``: ``aux_epochs`` at ``aux_lr`` on the samples with their true labels.

    Only their weights are kept (tensors; they run through the user's model with ``functional_call``).
    For an input with original prediction ``ŷ = argmax M(x)``, the default score (``rule="ratio"``) is::

        score(x) = log B(ŷ|x) - log M'(ŷ|x)

    high when the backdoor expert still backs ``ŷ`` while the auxiliary model does not (a triggered
    input), low when ``B`` has forgotten ``ŷ`` and ``M'`` keeps it (a benign input). ``rule="triangle"``
    uses the decision region of the authors' released code for ResNet-18 and ``rule="expert"`` ``B(ŷ|x)``
    alone (see :func:`~lightning_backdoor.detectors.functional.badexpert.combine`). When ``threshold`` is
    None it is set on the held-out benign samples so that at most ``target_fpr`` of them are flagged.
    ``expert_accuracy`` / ``aux_accuracy`` (on the held-out samples, true labels) tell whether the
    extraction worked: the expert should be far below the model, the auxiliary model close to it.
    Cost: three forward passes per input.

    Args:
        expert_lr, expert_epochs: fine-tuning of the backdoor expert on mislabelled samples.
        aux_lr, aux_epochs: fine-tuning of the auxiliary model on correctly labelled samples.
        rule: ``"ratio"``, ``"triangle"`` or ``"expert"``.
        wrong_labels: ``"shift"`` (``(y + 1) mod K``) or ``"random"``.
        threshold: decision threshold, or None to set it on held-out benign samples.
        target_fpr: benign false-positive rate for that threshold.
        calibration_fraction: share of the fitting samples held out for the threshold and the accuracies.
        max_fit_samples: benign samples used by ``fit``.
        batch_size, momentum, weight_decay: fine-tuning settings.
        seed: seed of the sample split, the wrong labels, the batch order and dropout.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> det = BaDExpert(expert_epochs=1, aux_epochs=1).fit(net, (torch.rand(20, 3, 2, 2), torch.arange(20) % 3))
        >>> det.score(net, torch.rand(4, 3, 2, 2)).shape
        torch.Size([4])
    """

    name = "badexpert"
    threat_model = "white-box, data-limited"
    requires_fit = True

    def __init__(
        self,
        expert_lr: float = 0.01,
        expert_epochs: int = 5,
        aux_lr: float = 0.01,
        aux_epochs: int = 5,
        rule: str = "ratio",
        wrong_labels: str = "shift",
        threshold: Optional[float] = None,
        target_fpr: float = 0.05,
        calibration_fraction: float = 0.2,
        max_fit_samples: int = 1000,
        batch_size: int = 64,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.expert_lr = check_positive_float(expert_lr, "expert_lr")
        self.expert_epochs = check_positive_int(expert_epochs, "expert_epochs")
        self.aux_lr = check_positive_float(aux_lr, "aux_lr")
        self.aux_epochs = check_positive_int(aux_epochs, "aux_epochs")
        self.rule = check_choice(rule, "rule", BADEXPERT_RULES)
        self.wrong_labels = check_choice(wrong_labels, "wrong_labels", WRONG_LABELS)
        self._threshold_arg = check_optional_real(threshold, "threshold")
        self.target_fpr = check_probability(target_fpr, "target_fpr", high_open=True)
        self.calibration_fraction = check_probability(calibration_fraction, "calibration_fraction", low_open=True,
                                                      high_open=True)
        self.max_fit_samples = check_positive_int(max_fit_samples, "max_fit_samples")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.momentum = check_non_negative_float(momentum, "momentum")
        self.weight_decay = check_non_negative_float(weight_decay, "weight_decay")
        self.seed = check_seed(seed)
        super().__init__(math.nan if threshold is None else float(threshold))
        self.expert: Optional[Dict[str, Tensor]] = None
        self.auxiliary: Optional[Dict[str, Tensor]] = None
        self.num_classes: Optional[int] = None
        self.expert_accuracy = math.nan
        self.aux_accuracy = math.nan
        self.model_accuracy = math.nan

    # -- interface -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, benign: Any) -> "BaDExpert":
        """Extract the backdoor expert and the auxiliary model from ``model`` on benign data; set the threshold."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if trainable_parameters(model) == 0:
            raise ValueError("BaDExpert fine-tunes copies of the model, but the model has no trainable parameters "
                             "(every parameter has requires_grad=False); unfreeze the layers to fine-tune")
        x, y = collect_benign(benign, model_device(model), self.max_fit_samples, seed=self.seed)
        if len(x) < MIN_FIT_SAMPLES:
            raise ValueError(f"BaDExpert needs at least {MIN_FIT_SAMPLES} benign fitting samples (it fine-tunes two "
                             f"copies of the model on them and calibrates on a held-out part), got {len(x)}")
        num_cal = min(len(x) - 2, max(1, round(self.calibration_fraction * len(x))))
        cal = random_subset(len(x), num_cal, seed=self.seed + 1).to(x.device)
        keep = torch.ones(len(x), dtype=torch.bool, device=x.device)
        keep[cal] = False
        x_tune, y_tune, x_cal, y_cal = x[keep], y[keep], x[cal], y[cal]
        num_classes, pred_cal = num_classes_of(model, x_cal)
        if int(y.max()) >= num_classes:
            raise ValueError(f"benign labels go up to {int(y.max())} but the model outputs {num_classes} classes")
        gen = torch.Generator().manual_seed(self.seed)
        wrong = wrong_labels(y_tune, num_classes, self.wrong_labels, gen)
        common = dict(batch_size=self.batch_size, momentum=self.momentum, weight_decay=self.weight_decay)
        self.expert = finetune_copy(model, x_tune, wrong, epochs=self.expert_epochs, lr=self.expert_lr,
                                    seed=self.seed, **common)
        self.auxiliary = finetune_copy(model, x_tune, y_tune, epochs=self.aux_epochs, lr=self.aux_lr,
                                       seed=self.seed + 1, **common)
        self.num_classes = num_classes
        self.expert_accuracy = accuracy_with(model, self.expert, x_cal, y_cal)
        self.aux_accuracy = accuracy_with(model, self.auxiliary, x_cal, y_cal)
        self.model_accuracy = float((pred_cal == y_cal).float().mean())
        self.fitted = True
        if self._threshold_arg is None:
            self.threshold = threshold_at_fpr(self._score(model, x_cal).float(), self.target_fpr)
        return self

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """The BaDExpert score of each input (float ``Tensor[N]``; higher = more likely poisoned)."""
        self._check_fitted()
        x = self._check_input(model, x)
        return self._score(model, x).float()

    def hparams(self) -> Dict[str, Any]:
        return {"expert_lr": self.expert_lr, "expert_epochs": self.expert_epochs, "aux_lr": self.aux_lr,
                "aux_epochs": self.aux_epochs, "rule": self.rule, "wrong_labels": self.wrong_labels,
                "threshold": self._threshold_arg, "target_fpr": self.target_fpr,
                "calibration_fraction": self.calibration_fraction, "max_fit_samples": self.max_fit_samples,
                "batch_size": self.batch_size, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"fitted": self.fitted, "threshold": self.threshold, "rule": self.rule}
        if self.fitted:
            state.update(expert=self.expert, auxiliary=self.auxiliary, num_classes=self.num_classes,
                         expert_accuracy=self.expert_accuracy, aux_accuracy=self.aux_accuracy,
                         model_accuracy=self.model_accuracy)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "rule" in state and state["rule"] != self.rule:
            raise ValueError(f"state was saved with rule={state['rule']!r} but this BaDExpert has rule={self.rule!r}")
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        if not self.fitted:
            return
        if not isinstance(state.get("expert"), dict) or not isinstance(state.get("auxiliary"), dict):
            raise ValueError("a fitted BaDExpert state must contain the 'expert' and 'auxiliary' weight dicts")
        self.expert, self.auxiliary = dict(state["expert"]), dict(state["auxiliary"])
        self.num_classes = int(state["num_classes"])
        for key in ("expert_accuracy", "aux_accuracy", "model_accuracy"):
            setattr(self, key, float(state.get(key, math.nan)))

    # -- helpers ---------------------------------------------------------------------------------
    def _score(self, model: nn.Module, x: Tensor) -> Tensor:
        assert self.expert is not None and self.auxiliary is not None
        device = x.device
        expert = {k: v.to(device) for k, v in self.expert.items()}
        aux = {k: v.to(device) for k, v in self.auxiliary.items()}
        return badexpert_score(model, x, expert, aux, self.rule)
