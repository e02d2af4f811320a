"""TeCo: test-time corruption-robustness consistency (black-box, label-only, data-free).

Liu et al., "Detecting Backdoors During the Inference Stage Based on Corruption Robustness
Consistency", CVPR 2023.

    det = TeCo()                      # 15 corruptions x severities 1...5 (needs imagecorruptions-imaug)
    scores = det.score(model, x)      # std over corruption types of the first severity that flips the label
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..utils import evaluating
from ..validation import check_choice, check_optional_positive_int, check_real, check_seed
from .base import DETECTORS, Detector
from .functional.consistency import check_sample_ids
from .functional.teco import (
    SEVERITIES,
    TECO_BACKENDS,
    TECO_CORRUPTIONS,
    check_corruptions,
    check_severities,
    teco_score,
)


@DETECTORS.register("teco")
class TeCo(Detector):
    """TeCo detector (black-box, label-only, data-free; docs/methods.md §4).

    For each corruption type ``t`` and severity ``s`` (increasing), the input is corrupted (a copy; the
    input is never modified) and classified; ``flip_t`` is the first severity whose label differs from the
    label of the input, 6 if none does. Score = population standard deviation of ``flip_t`` over the
    types (higher = more likely poisoned: a trigger survives some corruptions much longer than others).
    Cost: ``1 + T * S`` forwards per input (76 with the defaults) plus the corruptions.

    The corruptions are the common-corruption benchmark's, from the ``imagecorruptions`` package
    (``pip install imagecorruptions-imaug``); ``backend="torch"`` (default) runs the nine that have
    batched torch re-implementations on the input's device (on a CPU seven: defocus and glass blur
    are faster in the library there) and the library for the rest,
    ``backend="reference"`` uses the library for all (see
    :mod:`lightning_backdoor.detectors.functional.teco`). Randomness (noises, frost, fog, ...) is seeded
    per input: from ``(seed, id)`` with ``score(..., sample_ids=ids)`` (as the detection callback calls
    it), otherwise from the detector's own generator. Neither torch's nor numpy's global RNG is used.

    Args:
        corruptions: corruption types (default: the 15 of the benchmark).
        severities: severities tried, increasing, in 1...5 (default all five).
        threshold: ``predict`` flags ``score > threshold``; default 1.0 (severity spread of one level).
        backend: ``"torch"`` or ``"reference"``.
        batch_size: None (each forward is the size of the scored batch, one per copy) or a cap on
            the images per forward.
        seed: seed of the corruptions' randomness.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
        >>> TeCo(corruptions=("contrast", "defocus_blur"), severities=(1, 3)).score(net, torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    name = "teco"
    threat_model = "black-box, label-only, data-free"
    accepts_sample_ids = True

    def __init__(
        self,
        corruptions: Sequence[str] = TECO_CORRUPTIONS,
        severities: Sequence[int] = SEVERITIES,
        threshold: float = 1.0,
        backend: str = "torch",
        batch_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(check_real(threshold, "threshold"))
        self.corruptions = check_corruptions(corruptions)
        self.severities = check_severities(severities)
        self.backend = check_choice(backend, "backend", TECO_BACKENDS)
        self.batch_size = check_optional_positive_int(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def num_variants(self) -> int:
        """Corrupted copies per input (the ideal cost is ``1 + num_variants`` forwards)."""
        return len(self.corruptions) * len(self.severities)

    def base_seeds(self, num: int, sample_ids: Optional[Tensor] = None) -> list:
        """One base seed per input: from ``(seed, id)``, or drawn from the detector's generator."""
        if sample_ids is None:
            return torch.randint(0, 2 ** 31 - 1, (num,), generator=self.generator).tolist()
        ids = check_sample_ids(sample_ids, num)
        return [(self.seed * 1_000_003 + int(i) * 7919) % (2 ** 31 - 1) for i in ids.tolist()]

    def score(self, model: nn.Module, x: Tensor, sample_ids: Optional[Tensor] = None,
              return_flips: bool = False) -> Tensor:
        """Standard deviation over corruption types of the first label-changing severity (higher = poisoned).

        With ``return_flips`` also returns the ``[T, N]`` first-flip severities.
        """
        x = self._check_input(model, x)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"TeCo's corruptions need 1- or 3-channel images, got {x.shape[1]} channels")
        seeds = self.base_seeds(len(x), sample_ids)
        with evaluating(model):
            return teco_score(model, x, seeds, self.corruptions, self.severities, backend=self.backend,
                              batch_size=self.batch_size, return_flips=return_flips)

    def hparams(self) -> Dict[str, Any]:
        return {"corruptions": list(self.corruptions), "severities": list(self.severities),
                "threshold": self.threshold, "backend": self.backend, "batch_size": self.batch_size,
                "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted, "threshold": self.threshold, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        if "rng_state" in state:
            self.generator.set_state(state["rng_state"])
