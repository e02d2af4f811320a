"""SCALE-UP: scaled prediction consistency (black-box, label-only).

Guo et al., "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing
Scaled Prediction Consistency", ICLR 2023. Multiplying every pixel by ``n > 1`` (then clipping
to [0, 1]) leaves poisoned inputs on the target class while benign predictions drift.

    det = ScaleUp()                                  # data-free: score = SPC, threshold 0.5
    scores = det.score(model, x)

    det = ScaleUp(mode="data_limited").fit(model, benign_loader)
    scores = det.score(model, x)                     # per-predicted-class z-score of SPC
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..validation import (check_choice, check_optional_positive_int, check_optional_real, check_probability,
                          warn_ignored)
from ..utils import evaluating, model_device
from .base import DETECTORS, Detector, iter_benign, threshold_at_fpr
from .functional.scale_up import DEFAULT_SCALES, check_scales, scale_up_class_stats, scale_up_nspc, scale_up_spc

SCALE_UP_MODES = ("data_free", "data_limited", "data_limited_global")
SCALE_UP_GROUPINGS = ("true_label", "predicted")
#: Fewer benign fitting samples than this in a class triggers a warning in data-limited mode.
MIN_PER_CLASS = 10


@DETECTORS.register("scale_up")
class ScaleUp(Detector):
    """SCALE-UP input-level backdoor detector (black-box, label-only; docs/methods.md §2).

    Modes:
        ``"data_free"``: score = SPC(x), the share of scales ``n`` in ``scales`` for which
            ``C(clip(n*x, 0, 1)) == C(x)``. No fit needed. Default threshold **0.5**: an input is
            flagged when its prediction survives more than half of the scalings (a majority vote
            over ``S``; with the default five scales, SPC >= 0.6).
        ``"data_limited"`` (the paper's data-limited variant): ``fit`` records the mean and std of
            benign SPC per class ``i`` over the benign samples whose **true** label is ``i`` (the
            paper's ``X_i``; ``group_by="predicted"`` groups by the predicted label instead); the
            test input is normalised by its *predicted* class, score = ``(SPC - mu[C(x)]) / sigma[C(x)]``.
            A class whose benign SPC values are all equal (zero std, common: SPC takes only
            ``|S| + 1`` values) keeps its mean and uses the global benign std (listed in
            ``zero_std_classes``); a class without fitting samples uses the global mean and std, with
            a warning, as do classes with fewer than 10 fitting samples (the paper uses about 100 per
            class). If the global std is zero too, sigma = 1 is used (with a warning).
        ``"data_limited_global"``: one global benign mean/std (public-code form; a monotone
            transform of SPC, so AUROC equals the data-free one), for comparison.

    Threshold: ``threshold`` when given; otherwise 0.5 in data-free mode and, in the data-limited
    modes, set by ``fit`` so that at most ``target_fpr`` (default 5%) of the benign fit scores lie
    strictly above it (SPC is discrete, so the achieved FPR can be lower).

    Args:
        scales: scaling factors ``S`` (all > 0), paper default ``(3, 5, 7, 9, 11)``.
        mode: one of ``"data_free"``, ``"data_limited"``, ``"data_limited_global"``.
        threshold: decision threshold for ``predict`` (``score > threshold``), or None for the default.
        batch_size: None (default): one forward per scale, each exactly the size of the scored batch
            (cost: the ideal ``1 + |S|`` plain forwards at that batch size); or the maximum number of
            images per forward when the ``(1 + |S|) * N`` images are stacked and classified together
            (fewer, larger forwards: faster on a GPU with small batches, slower per image on a CPU;
            see :func:`~lightning_backdoor.detectors.functional.scale_up.scale_up_spc`).
        target_fpr: benign false-positive rate used to set the threshold in data-limited modes.
        group_by: ``"true_label"`` (paper, default) or ``"predicted"``: which label groups the benign
            fitting samples into classes in ``"data_limited"`` mode.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> ScaleUp().score(net, torch.rand(4, 3, 2, 2)).shape
        torch.Size([4])
    """

    name = "scale_up"
    threat_model = "black-box, label-only"

    def __init__(
        self,
        scales: Sequence[float] = DEFAULT_SCALES,
        mode: str = "data_free",
        threshold: Optional[float] = None,
        batch_size: Optional[int] = None,
        target_fpr: float = 0.05,
        group_by: str = "true_label",
    ) -> None:
        self.scales = check_scales(scales)
        self.group_by = check_choice(group_by, "group_by", SCALE_UP_GROUPINGS)
        self.mode = check_choice(mode, "mode", SCALE_UP_MODES)
        self.batch_size = check_optional_positive_int(batch_size, "batch_size")
        self.target_fpr = check_probability(target_fpr, "target_fpr", high_open=True)
        self._threshold_arg = check_optional_real(threshold, "threshold")
        if mode == "data_free" and target_fpr != 0.05:
            warn_ignored("ScaleUp", "target_fpr", target_fpr, "data_free mode has the fixed threshold 0.5 (or the given "
                         "one); target_fpr sets the threshold in the data-limited modes")
        elif threshold is not None and target_fpr != 0.05:
            warn_ignored("ScaleUp", "target_fpr", target_fpr, f"threshold={threshold} is given")
        if mode != "data_limited" and group_by != "true_label":
            warn_ignored("ScaleUp", "group_by", group_by, "it groups the fitting samples in mode='data_limited' only")
        default = 0.5 if mode == "data_free" else math.nan
        super().__init__(default if threshold is None else float(threshold))
        self.requires_fit = mode != "data_free"
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.num_classes = 0
        self.mean_per_class: Optional[Tensor] = None
        self.std_per_class: Optional[Tensor] = None
        self.counts: Optional[Tensor] = None
        self.zero_std_classes: list = []
        self.global_mean = math.nan
        self.global_std = math.nan

    # -- interface -------------------------------------------------------------------------------
    def fit(self, model: nn.Module, benign: Any) -> "ScaleUp":
        """Data-limited modes: per-class (and global) benign SPC statistics, and the threshold if none
        was given. Data-free mode: nothing to fit."""
        if self.mode == "data_free":
            self.fitted = True
            return self
        device = model_device(model)
        spcs, preds, labels = [], [], []
        with evaluating(model):
            for x, y in iter_benign(benign, device):
                spc, pred = scale_up_spc(model, x, self.scales, batch_size=self.batch_size, return_pred=True)
                spcs.append(spc)
                preds.append(pred)
                labels.append(y)
        spc, pred, y = torch.cat(spcs).cpu(), torch.cat(preds).cpu(), torch.cat(labels).cpu()
        num_classes = max(int(y.max()), int(pred.max())) + 1

        gmean, gstd = float(spc.mean()), float(spc.std(correction=0))
        if gstd == 0:
            warnings.warn(
                f"ScaleUp.fit: all {len(spc)} benign SPC values equal {gmean:.3g}, so the benign data gives no "
                "spread to normalise by; using std 1 (scores are SPC - mean). SCALE-UP cannot separate anything "
                "on this model unless poisoned inputs differ in SPC: check the model is trained",
                UserWarning,
                stacklevel=2,
            )
            gstd = 1.0
        groups = y if self.group_by == "true_label" else pred
        mean, std, counts = scale_up_class_stats(spc, groups, num_classes)
        if self.mode == "data_limited":
            self._warn_about_classes(counts)
        missing = counts == 0
        zero_std = ~missing & ~(std > 0)
        # a class whose benign SPC values are all equal keeps its mean and borrows the global spread;
        # a class without fitting samples falls back to the global mean and std
        self.mean_per_class = torch.where(missing, torch.full_like(mean, gmean), mean)
        self.std_per_class = torch.where(missing | zero_std, torch.full_like(std, gstd), std)
        self.counts = counts
        self.zero_std_classes = zero_std.nonzero().flatten().tolist()
        self.num_classes = num_classes
        self.global_mean, self.global_std = gmean, gstd
        self.fitted = True
        if self._threshold_arg is None:
            self.threshold = threshold_at_fpr(self._transform(spc, pred), self.target_fpr)
        return self

    def _warn_about_classes(self, counts: Tensor) -> None:
        missing = (counts == 0).nonzero().flatten().tolist()
        few = ((counts > 0) & (counts < MIN_PER_CLASS)).nonzero().flatten().tolist()
        what = "true" if self.group_by == "true_label" else "predicted"
        if missing:
            warnings.warn(
                f"ScaleUp.fit: classes {missing} have no benign fitting samples (grouped by {what} label); inputs "
                "predicted as them are normalised with the global benign mean/std. Fit on benign data holding every "
                "class (BackdoorDataModule's defense split is stratified; raise defense_size / fit_samples)",
                UserWarning,
                stacklevel=3,
            )
        if few:
            warnings.warn(
                f"ScaleUp.fit: classes {few} have fewer than {MIN_PER_CLASS} benign fitting samples "
                f"({[int(counts[c]) for c in few]}); their per-class SPC statistics are noisy (the paper uses about "
                "100 per class). Raise defense_size / fit_samples",
                UserWarning,
                stacklevel=3,
            )

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """SPC (data-free) or normalised SPC (data-limited) of ``x``; higher = more likely poisoned."""
        self._check_fitted()
        x = self._check_input(model, x)
        with evaluating(model):
            spc, pred = scale_up_spc(model, x, self.scales, batch_size=self.batch_size, return_pred=True)
        return self._transform(spc, pred)

    def hparams(self) -> Dict[str, Any]:
        return {
            "scales": list(self.scales),
            "mode": self.mode,
            "threshold": self._threshold_arg,
            "batch_size": self.batch_size,
            "target_fpr": self.target_fpr,
            "group_by": self.group_by,
        }

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {
            "fitted": self.fitted,
            "threshold": self.threshold,
            "mode": self.mode,
            "scales": list(self.scales),
            "group_by": self.group_by,
        }
        if self.mode != "data_free" and self.fitted:
            state.update(
                num_classes=self.num_classes,
                mean_per_class=self.mean_per_class,
                std_per_class=self.std_per_class,
                counts=self.counts,
                zero_std_classes=list(self.zero_std_classes),
                global_mean=self.global_mean,
                global_std=self.global_std,
            )
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, mine in (("mode", self.mode), ("scales", list(self.scales)), ("group_by", self.group_by)):
            if key in state and state[key] != mine:
                raise ValueError(f"state was saved with {key}={state[key]!r} but this ScaleUp has {key}={mine!r}")
        super().load_state_dict(state)
        self.threshold = float(state.get("threshold", self.threshold))
        self._reset_stats()
        if self.mode != "data_free" and self.fitted:
            self.num_classes = int(state["num_classes"])
            self.mean_per_class = state["mean_per_class"].float().cpu()
            self.std_per_class = state["std_per_class"].float().cpu()
            self.counts = state["counts"].long().cpu()
            self.zero_std_classes = [int(c) for c in state.get("zero_std_classes", [])]
            self.global_mean = float(state["global_mean"])
            self.global_std = float(state["global_std"])

    # -- helpers ---------------------------------------------------------------------------------
    def _transform(self, spc: Tensor, pred: Tensor) -> Tensor:
        if self.mode == "data_free":
            return spc
        if self.mode == "data_limited_global":
            return (spc - self.global_mean) / self.global_std
        assert self.mean_per_class is not None and self.std_per_class is not None
        mean, std = self.mean_per_class, self.std_per_class
        top = int(pred.max()) + 1 if len(pred) else 0
        if top > len(mean):
            warnings.warn(
                f"ScaleUp.score: predicted classes >= {len(mean)} were not seen when fitting; "
                "they use the global benign mean/std",
                UserWarning,
                stacklevel=3,
            )
            extra = top - len(mean)
            mean = torch.cat([mean, torch.full((extra,), self.global_mean)])
            std = torch.cat([std, torch.full((extra,), self.global_std)])
        return scale_up_nspc(spc, pred, mean, std)
