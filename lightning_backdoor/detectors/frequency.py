"""Frequency: a clean-vs-triggered classifier on DCT spectra (model-free, data-limited).

Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective", ICCV 2021.

    det = Frequency().fit(model, benign_loader)    # trains on benign images + defender-made triggers
    scores = det.score(model, x)                   # logit(triggered) - logit(clean)
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor, nn

from ..utils import model_device
from ..validation import check_positive_float, check_positive_int, check_real, check_seed
from .base import DETECTORS, Detector, collect_benign
from .functional.frequency import FrequencyNet, frequency_score, train_frequency_classifier


@DETECTORS.register("frequency")
class Frequency(Detector):
    """Frequency-domain detector (model-free, data-limited; docs/methods.md §4).

    ``fit`` trains a small CNN (:class:`~lightning_backdoor.detectors.functional.frequency.FrequencyNet`)
    on the standardised orthonormal 2-D DCT of at most ``max_fit_samples`` benign images (a seeded
    random sample) against copies of them carrying triggers the defender synthesises (random patches,
    blends and additive noise, fresh each epoch) -- never the real attack's trigger. Score =
    ``logit(triggered) - logit(clean)`` of that classifier (higher = more likely poisoned); the default
    threshold 0 is the classifier's own decision. The classifier under attack is not used (only its
    device). Training is seeded and leaves the global RNG untouched; it takes a few seconds on the
    embedded data on a CPU. Scoring images of another size or channel count than the fit images is
    refused.

    Args:
        epochs, lr, batch_size, width: training of the spectrum classifier (Adam).
        max_fit_samples: benign images used for training.
        threshold: ``predict`` flags ``score > threshold``.
        seed: seed of the training.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        >>> det = Frequency(epochs=1).fit(net, (torch.rand(8, 1, 8, 8), torch.arange(8) % 3))
        >>> det.score(net, torch.rand(2, 1, 8, 8)).shape
        torch.Size([2])
    """

    name = "frequency"
    threat_model = "model-free, data-limited"
    requires_fit = True

    def __init__(self, epochs: int = 10, lr: float = 3e-3, batch_size: int = 64, width: int = 8,
                 max_fit_samples: int = 1000, threshold: float = 0.0, seed: int = 0) -> None:
        super().__init__(check_real(threshold, "threshold"))
        self.epochs = check_positive_int(epochs, "epochs")
        self.lr = check_positive_float(lr, "lr")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.width = check_positive_int(width, "width")
        self.max_fit_samples = check_positive_int(max_fit_samples, "max_fit_samples")
        self.seed = check_seed(seed)
        self.net: Optional[FrequencyNet] = None
        self.mean: Optional[Tensor] = None
        self.std: Optional[Tensor] = None
        self.image_shape: Optional[tuple] = None

    def fit(self, model: nn.Module, benign: Any) -> "Frequency":
        """Train the spectrum classifier on benign images and defender-made triggered copies of them."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        x, _ = collect_benign(benign, model_device(model), self.max_fit_samples, seed=self.seed)
        if len(x) < 2:
            raise ValueError(f"Frequency needs at least 2 benign images to train its classifier, got {len(x)}")
        self.net, self.mean, self.std = train_frequency_classifier(
            x.float(), seed=self.seed, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, width=self.width)
        self.image_shape = tuple(int(s) for s in x.shape[1:])
        self.fitted = True
        return self

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """``logit(triggered) - logit(clean)`` on each input's DCT spectrum (higher = more likely poisoned)."""
        self._check_fitted()
        x = self._check_input(model, x)
        assert self.net is not None and self.mean is not None and self.std is not None
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"Frequency was fitted on images of shape {self.image_shape} (C, H, W) but got images "
                             f"of shape {tuple(x.shape[1:])}; fit it on benign images of the size it scores")
        device = x.device
        net = self.net.to(device)
        return frequency_score(net, x.float(), self.mean.to(device), self.std.to(device))

    def hparams(self) -> Dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "width": self.width,
                "max_fit_samples": self.max_fit_samples, "threshold": self.threshold, "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"fitted": self.fitted, "threshold": self.threshold, "width": self.width}
        if self.fitted and self.net is not None:
            state.update(image_shape=list(self.image_shape or ()), net=self.net.state_dict(), mean=self.mean,
                         std=self.std)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        if not self.fitted:
            return
        if "net" not in state or "image_shape" not in state:
            raise ValueError("a fitted Frequency state must contain its classifier 'net' and 'image_shape'")
        self.image_shape = tuple(int(s) for s in state["image_shape"])
        self.width = int(state.get("width", self.width))
        net = FrequencyNet(self.image_shape[0], self.width)
        net.load_state_dict(state["net"])
        device = state["mean"].device
        self.net = net.to(device).eval()
        self.mean, self.std = state["mean"], state["std"]
