"""STRIP: entropy of superimposed inputs (black-box, probabilities).

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019.

    det = Strip(n=100).fit(model, benign_loader)   # stores a clean pool, sets the threshold
    scores = det.score(model, x)                   # -mean entropy over classes; higher = poisoned
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..validation import (check_choice, check_optional_real, check_positive_int, check_probability, check_seed,
                          warn_ignored)
from ..utils import evaluating, model_device, random_subset
from .base import DETECTORS, Detector, collect_benign, threshold_at_fpr
from .functional.strip import STRIP_MODES, strip_entropy, strip_overlay_indices


@DETECTORS.register("strip")
class Strip(Detector):
    """STRIP input-level backdoor detector (black-box, softmax probabilities; docs/methods.md §4).

    Each input is superimposed with ``n`` random images from a clean pool -- ``"add"``: pixel-wise
    sum clipped to [0, 1] as in the original, or ``"average"``: 50/50 blend -- and the score is
    minus the mean entropy (nats) of the softmax over classes of those superimposed inputs.

    ``fit(model, benign)`` keeps a seeded random sample of ``pool_size`` benign images (on the
    model's device) as the clean pool and, when ``threshold`` is None, scores *all* benign fit images
    and sets the threshold so that at most ``target_fpr`` (default **5%**) of them are flagged. A
    calibration image that is in the pool is never blended with itself (a test input is never in
    the pool either), so the calibration scores follow the distribution of benign test scores.
    The original STRIP fixes the false-rejection rate on held-out clean data at 1%: pass
    ``target_fpr=0.01`` for that; 5% is the default because data-limited fit sets are small and
    their 1% tail is noisy.

    Randomness comes from a detector-owned ``torch.Generator`` seeded with ``seed`` (the global
    RNG is never used); its state is part of ``state_dict``. With ``score(..., sample_ids=ids)``
    each input's overlays come from ``(seed, id)`` instead, as the detection callback does so that
    scores are the same whatever the batching or the DDP rank.

    Args:
        n: overlays per input (original: 100).
        mode: ``"add"`` or ``"average"``.
        threshold: decision threshold on the score (``-entropy``), or None to set it in ``fit``.
        pool_size: maximum number of clean images kept for superimposition.
        target_fpr: benign false-positive rate used to set the threshold when it is None.
        batch_size: maximum superimposed images per forward pass.
        seed: seed of the detector's generator.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> det = Strip(n=4).fit(net, (torch.rand(8, 3, 2, 2), torch.randint(3, (8,))))
        >>> det.score(net, torch.rand(2, 3, 2, 2)).shape
        torch.Size([2])
    """

    name = "strip"
    threat_model = "black-box, probabilities"
    requires_fit = True
    accepts_sample_ids = True

    def __init__(
        self,
        n: int = 100,
        mode: str = "add",
        threshold: Optional[float] = None,
        pool_size: int = 1000,
        target_fpr: float = 0.05,
        batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        self.n = check_positive_int(n, "n")
        self.mode = check_choice(mode, "mode", STRIP_MODES)
        self.pool_size = check_positive_int(pool_size, "pool_size")
        self.target_fpr = check_probability(target_fpr, "target_fpr", high_open=True)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self._threshold_arg = check_optional_real(threshold, "threshold")
        if threshold is not None and target_fpr != 0.05:
            warn_ignored("Strip", "target_fpr", target_fpr, f"threshold={threshold} is given")
        super().__init__(math.nan if threshold is None else float(threshold))
        self.pool: Optional[Tensor] = None
        self.generator = torch.Generator().manual_seed(seed)

    # -- interface -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, benign: Any) -> "Strip":
        """Store the clean pool and, if no threshold was given, set it from benign scores."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        device = model_device(model)
        x_fit, _ = collect_benign(benign, device)
        pool_pos = random_subset(len(x_fit), self.pool_size, self.seed).to(device)
        self.pool = x_fit[pool_pos]
        if len(self.pool) < self.n:
            warnings.warn(f"Strip.fit: the clean pool holds {len(self.pool)} images but n={self.n} overlays are drawn per "
                          "input, so overlays repeat (drawn with replacement); fit on at least n benign images or "
                          "lower n", UserWarning, stacklevel=2)
        self.fitted = True
        if self._threshold_arg is None:
            if len(x_fit) < 2:
                raise ValueError(f"Strip needs at least 2 benign images to set its threshold (each calibration image "
                                 f"is blended with the others only), got {len(x_fit)}")
            # every fit image is scored, each blended only with *other* pool images: a test input is
            # never in the pool, so blending an image with itself would bias the threshold
            exclude = torch.full((len(x_fit),), -1, dtype=torch.long, device=device)
            exclude[pool_pos] = torch.arange(len(pool_pos), device=device)
            with evaluating(model):
                scores = [self._score(model, x_fit[i:i + self.batch_size], exclude=exclude[i:i + self.batch_size])
                          for i in range(0, len(x_fit), self.batch_size)]
            self.threshold = threshold_at_fpr(torch.cat(scores), self.target_fpr)
        return self

    def score(self, model: nn.Module, x: Tensor, sample_ids: Optional[Tensor] = None) -> Tensor:
        """Minus the mean class-entropy of ``n`` superimposed copies of each input (higher = poisoned).

        Args:
            model: the classifier.
            x: images ``[N, C, H, W]`` in ``[0, 1]``.
            sample_ids: optional ``[N]`` integer ids; input ``i``'s overlays are then drawn from a
                generator seeded with ``(seed, sample_ids[i])`` instead of the detector's running
                generator, so its score does not depend on batching or on the DDP rank scoring it.
        """
        self._check_fitted()
        x = self._check_input(model, x)
        indices = None
        if sample_ids is not None:
            indices = self._indices_for(sample_ids, len(x)).to(x.device)
        with evaluating(model):
            return self._score(model, x, indices)

    def hparams(self) -> Dict[str, Any]:
        return {
            "n": self.n,
            "mode": self.mode,
            "threshold": self._threshold_arg,
            "pool_size": self.pool_size,
            "target_fpr": self.target_fpr,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "fitted": self.fitted,
            "threshold": self.threshold,
            "pool": self.pool,
            "rng_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        self.pool = state.get("pool")
        if "rng_state" in state:
            self.generator.set_state(state["rng_state"])
        if self.fitted and self.pool is None:
            raise ValueError("a fitted Strip state must contain its clean 'pool' tensor")

    # -- helpers ---------------------------------------------------------------------------------
    def _indices_for(self, sample_ids: Any, num: int) -> Tensor:
        ids = torch.as_tensor(sample_ids)
        if ids.dim() != 1 or len(ids) != num or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"sample_ids must be an integer Tensor[{num}] (one id per input), got "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")
        assert self.pool is not None
        rows = [strip_overlay_indices(1, len(self.pool), self.n,
                                      torch.Generator().manual_seed((self.seed * 1_000_003 + int(i)) % 2**63))[0]
                for i in ids.tolist()]
        return torch.stack(rows) if rows else torch.zeros(0, self.n, dtype=torch.long)

    def _score(self, model: nn.Module, x: Tensor, indices: Optional[Tensor] = None,
               exclude: Optional[Tensor] = None) -> Tensor:
        assert self.pool is not None
        return strip_entropy(
            model, x, self.pool, self.n, self.generator, self.mode, batch_size=self.batch_size, indices=indices,
            exclude=exclude,
        )
