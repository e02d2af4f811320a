"""ShrinkPad as an input-level detector (black-box, label-only, data-free).

Li et al., "Backdoor Attack in the Physical World", ICLR 2021 workshop on RobustML (the
shrink-and-pad pre-processing); a baseline detector of the SCALE-UP and IBD-PSC papers.

    det = ShrinkPad(shrink=4, n=8)
    scores = det.score(model, x)      # share of random paddings that change the prediction
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..utils import evaluating
from ..validation import check_optional_positive_int, check_positive_int, check_real, check_seed
from .base import DETECTORS, Detector
from .functional.consistency import check_sample_ids, per_sample_generators
from .functional.shrink_pad import check_shrink, shrink_pad_score


@DETECTORS.register("shrink_pad")
class ShrinkPad(Detector):
    """ShrinkPad detector (black-box, label-only, data-free; docs/methods.md §4).

    Each input is shrunk by ``shrink`` pixels (bilinear, antialiased) and zero-padded back to its size
    at ``n`` random offsets; score = share of those ``n`` copies whose predicted label differs from the
    label of the unchanged input (``[0, 1]``, higher = more likely poisoned: a trigger tied to a place
    in the image is moved or damaged, so a backdoored prediction changes more often than a benign one).
    Cost: ``1 + n`` forward passes per input.

    Offsets come from a detector-owned generator (``seed``; its state is in ``state_dict``), or, with
    ``score(..., sample_ids=ids)`` as the detection callback calls it, from ``(seed, id)`` per input, so a
    sample's score does not depend on its batch or DDP rank. The global RNG is never used.

    Args:
        shrink: pixels removed from height and width (1 <= shrink < image size); 4 is the usual value
            for 32x32 images.
        n: random paddings per input.
        threshold: ``predict`` flags ``score > threshold`` (default 0.5: more than half the paddings
            change the label).
        batch_size: None (each forward is the size of the scored batch, one per copy) or a cap on
            the images per forward.
        seed: seed of the offsets.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
        >>> ShrinkPad(shrink=2, n=4).score(net, torch.rand(5, 3, 8, 8)).shape
        torch.Size([5])
    """

    name = "shrink_pad"
    threat_model = "black-box, label-only, data-free"
    accepts_sample_ids = True

    def __init__(self, shrink: int = 4, n: int = 8, threshold: float = 0.5, batch_size: Optional[int] = None,
                 seed: int = 0) -> None:
        super().__init__(check_real(threshold, "threshold"))
        self.shrink = check_positive_int(shrink, "shrink")
        self.n = check_positive_int(n, "n")
        self.batch_size = check_optional_positive_int(batch_size, "batch_size")
        self.seed = check_seed(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def offsets(self, num: int, sample_ids: Optional[Tensor] = None) -> Tensor:
        """The ``[num, n, 2]`` (top, left) offsets the next ``score`` call would use (it draws them)."""
        if sample_ids is None:
            return torch.randint(0, self.shrink + 1, (num, self.n, 2), generator=self.generator)
        ids = check_sample_ids(sample_ids, num)
        rows = [torch.randint(0, self.shrink + 1, (self.n, 2), generator=g)
                for g in per_sample_generators(self.seed, ids)]
        return torch.stack(rows) if rows else torch.zeros(0, self.n, 2, dtype=torch.long)

    def score(self, model: nn.Module, x: Tensor, sample_ids: Optional[Tensor] = None) -> Tensor:
        """Share of ``n`` random shrink-and-pad copies whose label differs from ``C(x)`` (higher = poisoned)."""
        x = self._check_input(model, x)
        check_shrink(self.shrink, x.shape[-2], x.shape[-1])
        offsets = self.offsets(len(x), sample_ids)
        with evaluating(model):
            return shrink_pad_score(model, x, self.shrink, offsets, batch_size=self.batch_size)

    def hparams(self) -> Dict[str, Any]:
        return {"shrink": self.shrink, "n": self.n, "threshold": self.threshold, "batch_size": self.batch_size,
                "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        return {"fitted": self.fitted, "threshold": self.threshold, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        if "rng_state" in state:
            self.generator.set_state(state["rng_state"])
