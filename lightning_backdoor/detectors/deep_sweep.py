"""DeepSweep as an input-level detector (black-box, label-only, data-free).

Qiu et al., "DeepSweep: An Evaluation Framework for Mitigating DNN Backdoor Attacks using Data
Augmentation", AsiaCCS 2021; a baseline detector of the SCALE-UP and IBD-PSC papers.

    det = DeepSweep()                 # affine x4, median, Gaussian blur, 3-bit, down/up-sampling
    scores = det.score(model, x)      # share of transformed copies that change the prediction
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..utils import evaluating
from ..validation import check_optional_positive_int, check_positive_int, check_real, check_seed
from .base import DETECTORS, Detector
from .functional.consistency import check_sample_ids, per_sample_generators
from .functional.deep_sweep import (
    DEEP_SWEEP_TRANSFORMS,
    check_transforms,
    deep_sweep_score,
    num_deep_sweep_variants,
    random_affine_params,
)


@DETECTORS.register("deep_sweep")
class DeepSweep(Detector):
    """DeepSweep detector (black-box, label-only, data-free; docs/methods.md §4).

    Score = share of the transformed copies of an input whose predicted label differs from the label
    of the input itself (``[0, 1]``, higher = more likely poisoned). The transformations are one family
    each of those DeepSweep found to invalidate triggers at inference time: ``n_affine`` random affine
    copies, a 3x3 median filter, a 3x3 Gaussian blur, 3-bit re-quantisation and down/up-sampling (see
    :mod:`lightning_backdoor.detectors.functional.deep_sweep`). Cost: ``1 + n_affine + 4`` forwards.

    The affine parameters come from a detector-owned generator, or from ``(seed, id)`` per input with
    ``score(..., sample_ids=ids)`` (as the detection callback calls it). The input is never modified.

    Args:
        transforms: which transformations to use (any of ``DEEP_SWEEP_TRANSFORMS``).
        n_affine: random affine copies per input.
        threshold: ``predict`` flags ``score > threshold`` (default 0.5).
        batch_size: None (each forward is the size of the scored batch, one per copy) or a cap on
            the images per forward.
        seed: seed of the affine parameters.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        >>> DeepSweep(n_affine=2).score(net, torch.rand(3, 1, 8, 8)).shape
        torch.Size([3])
    """

    name = "deep_sweep"
    threat_model = "black-box, label-only, data-free"
    accepts_sample_ids = True

    def __init__(self, transforms: Sequence[str] = DEEP_SWEEP_TRANSFORMS, n_affine: int = 4, threshold: float = 0.5,
                 batch_size: Optional[int] = None, seed: int = 0) -> None:
        super().__init__(check_real(threshold, "threshold"))
        self.transforms = check_transforms(transforms)
        self.n_affine = check_positive_int(n_affine, "n_affine")
        self.batch_size = check_optional_positive_int(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def num_variants(self) -> int:
        """Transformed copies per input (the ideal cost is ``1 + num_variants`` forwards)."""
        return num_deep_sweep_variants(self.transforms, self.n_affine)

    def affine_params(self, num: int, sample_ids: Optional[Tensor] = None) -> Optional[Tensor]:
        """The ``[num, n_affine, 4]`` affine parameters the next ``score`` call would use (it draws them)."""
        if "affine" not in self.transforms:
            return None
        if sample_ids is None:
            return random_affine_params(num * self.n_affine, self.generator).view(num, self.n_affine, 4)
        ids = check_sample_ids(sample_ids, num)
        rows = [random_affine_params(self.n_affine, g) for g in per_sample_generators(self.seed, ids)]
        return torch.stack(rows) if rows else torch.zeros(0, self.n_affine, 4)

    def score(self, model: nn.Module, x: Tensor, sample_ids: Optional[Tensor] = None) -> Tensor:
        """Share of transformed copies whose label differs from ``C(x)`` (higher = more likely poisoned)."""
        x = self._check_input(model, x)
        params = self.affine_params(len(x), sample_ids)
        with evaluating(model):
            return deep_sweep_score(model, x, self.transforms, params, batch_size=self.batch_size)

    def hparams(self) -> Dict[str, Any]:
        return {"transforms": list(self.transforms), "n_affine": self.n_affine, "threshold": self.threshold,
                "batch_size": self.batch_size, "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted, "threshold": self.threshold, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        if "rng_state" in state:
            self.generator.set_state(state["rng_state"])
