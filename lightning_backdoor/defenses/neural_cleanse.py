"""Neural Cleanse: model-level backdoor detection, trigger reverse-engineering and mitigation.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019. Threat model: white-box, data-limited (docs/neural_cleanse.md).

    nc = NeuralCleanse(steps=300).fit(model, clean)      # all labels reverse-engineered in one batched run
    nc.flagged, nc.anomaly, nc.l1                        # infected labels, MAD anomaly index, mask norms
    nc.report()                                          # per label: l1, anomaly_index, asr, flagged, ...
    nc.overlap(true_mask)                                # per label: overlap with a known trigger region
    pruned, history = nc.prune(model, clean)             # mitigation (b): BA / ASR after each step
    # (a) input filter: lightning_backdoor.detectors.NeuralCleanseFilter (a Detector)
    # (c) unlearning:   lightning_backdoor.losses.NeuralCleanseUnlearning (configs/neural_cleanse_unlearn.yaml)
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..detectors.base import collect_benign
from ..models.outputs import check_logits
from ..utils import evaluating, model_device, model_dtype
from ..validation import (check_above_one, check_bool, check_optional_positive_int, check_positive_float,
                          check_positive_int, check_probability, check_seed)
from .base import DEFENSES, ModelDefense
from .functional.neural_cleanse import (
    NeuronMask,
    accuracy,
    anomaly_index,
    default_layer,
    find_layer,
    flagged_labels,
    layer_activations,
    mask_overlap,
    median,
    rank_neurons,
    reverse_engineer,
    stamp,
    trigger_asr,
)


def check_clean(clean: Any, owner: str) -> None:
    """``clean`` must be a DataLoader, an iterable of batches or an ``(x, y)`` pair (not None / empty)."""
    if clean is None:
        raise ValueError(f"{owner} needs clean labelled images to reverse-engineer triggers with, got clean=None; "
                         "pass a DataLoader of (x, y) batches or an (x, y) pair of tensors (images in [0, 1])")
    if isinstance(clean, (tuple, list)) and len(clean) == 2 and isinstance(clean[0], Tensor) and len(clean[0]) == 0:
        raise ValueError(f"{owner} needs clean labelled images to reverse-engineer triggers with, got an empty "
                         "(x, y) pair; pass at least a few images per class")
    ds = getattr(clean, "dataset", None)
    if ds is not None and hasattr(ds, "__len__") and len(ds) == 0:
        raise ValueError(f"{owner} needs clean labelled images to reverse-engineer triggers with, got a DataLoader "
                         "over an empty dataset; pass at least a few images per class")


@DEFENSES.register("neural_cleanse")
class NeuralCleanse(ModelDefense):
    """Neural Cleanse (Wang et al., S&P 2019): reverse-engineer a minimal trigger per label, flag outliers.

    ``fit(model, clean)`` optimises one mask/pattern pair per label -- all labels in the same
    forward passes (:func:`~lightning_backdoor.defenses.functional.reverse_engineer`, equal to the
    per-label loop) -- in pixel space ``[0, 1]`` with the paper's adaptive λ schedule, then
    computes the MAD anomaly index of the masks' L1 norms (×1.4826) and flags the labels whose
    *small* norm has an index above ``anomaly_threshold`` (2). The model is not modified.

    Fitted state (``state_dict``): ``labels``, ``masks`` ``[L, 1, H, W]``, ``patterns``
    ``[L, C, H, W]``, ``l1``, ``anomaly``, ``asr`` (of each reversed trigger on the clean images
    whose label differs), ``found``, ``steps`` -- tensors and plain values, ``weights_only``-safe.

    Args:
        steps: maximum optimisation steps (one Adam update on one mini-batch each).
        batch_size: clean images per step (each stamped with every label's trigger).
        lr: Adam learning rate.
        init_cost: λ once the attack first succeeds (paper: 1e-3); must be > 0.
        cost_multiplier: λ is multiplied by it going up, divided by its 1.5th power going down (> 1).
        patience: steps above/below the ASR threshold before λ moves.
        early_stop_patience: steps without a smaller mask (after λ moved both ways) before stopping.
        asr_threshold: attack success a mask must reach to count, in ``(0, 1]`` (paper: 0.99).
        anomaly_threshold: anomaly index above which a small norm is flagged (paper: 2).
        max_samples: cap on the clean images used (a seeded random sample; None: all).
        labels: labels to inspect (default: all).
        batched: all labels in one run (``False``: the per-label loop, for comparison).
        seed: seeds the initial triggers, the mini-batches and the capped sample.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> nc = NeuralCleanse(steps=5, batch_size=4).fit(net, (torch.rand(8, 1, 4, 4), torch.arange(8) % 3))
        >>> nc.masks.shape, len(nc.report())
        (torch.Size([3, 1, 4, 4]), 3)
    """

    name = "neural_cleanse"
    threat_model = "white-box, data-limited"

    def __init__(
        self,
        steps: int = 300,
        batch_size: int = 32,
        lr: float = 0.1,
        init_cost: float = 1e-3,
        cost_multiplier: float = 1.5,
        patience: int = 5,
        early_stop_patience: int = 20,
        asr_threshold: float = 0.99,
        anomaly_threshold: float = 2.0,
        max_samples: Optional[int] = 500,
        labels: Optional[Sequence[int]] = None,
        batched: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.steps = check_positive_int(steps, "steps")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.lr = check_positive_float(lr, "lr")
        if isinstance(init_cost, (int, float)) and not isinstance(init_cost, bool) and init_cost < 0:
            raise ValueError(f"init_cost (the L1 weight lambda) must be > 0, got {init_cost}; a negative lambda would "
                             "reward large masks (paper: 1e-3)")
        self.init_cost = check_positive_float(init_cost, "init_cost")
        self.cost_multiplier = check_above_one(cost_multiplier, "cost_multiplier", "lambda could not move")
        self.patience = check_positive_int(patience, "patience")
        self.early_stop_patience = check_positive_int(early_stop_patience, "early_stop_patience")
        self.asr_threshold = check_probability(asr_threshold, "asr_threshold", low_open=True)
        self.anomaly_threshold = check_positive_float(anomaly_threshold, "anomaly_threshold")
        self.max_samples = check_optional_positive_int(max_samples, "max_samples")
        if labels is not None:
            labels = [check_positive_int(t, "labels[i]", allow_zero=True) for t in labels]
            if not labels:
                raise ValueError("labels must be None (all labels) or a non-empty list of class indices")
        self.label_subset = labels
        self.batched = check_bool(batched, "batched")
        self.seed = check_seed(seed)
        self.labels: Optional[Tensor] = None
        self.masks: Optional[Tensor] = None
        self.patterns: Optional[Tensor] = None
        self.l1: Optional[Tensor] = None
        self.anomaly: Optional[Tensor] = None
        self.asr: Optional[Tensor] = None
        self.found: Optional[Tensor] = None
        self.steps_run: Optional[Tensor] = None

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, model: nn.Module, clean: Any, progress: Optional[Callable[[int], None]] = None) -> "NeuralCleanse":
        """Reverse-engineer every label's trigger on ``clean`` data and compute the anomaly index.

        Args:
            model: the classifier under inspection (logits ``[N, K]``, ``K >= 2``, for pixel-space input).
            clean: clean labelled images: a DataLoader of ``(x, y, ...)`` batches or an ``(x, y)`` pair.
            progress: called with the number of steps done (e.g. ``tqdm.update``); total
                :meth:`total_steps`.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_clean(clean, "NeuralCleanse.fit")
        device = model_device(model)
        x, y = collect_benign(clean, device=device, max_samples=self.max_samples, seed=self.seed)
        x = x.to(dtype=model_dtype(model))
        with evaluating(model):
            k = int(check_logits(model(x[:1]), "the model (NeuralCleanse)").shape[1])
        labels = self.label_subset if self.label_subset is not None else list(range(k))
        for t in labels:
            if t >= k:
                raise ValueError(f"labels holds {t} but the model has {k} classes (labels 0..{k - 1})")
        g = torch.Generator().manual_seed(self.seed)
        res = reverse_engineer(model, x, y, labels, steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                               init_cost=self.init_cost, cost_multiplier=self.cost_multiplier, patience=self.patience,
                               early_stop_patience=self.early_stop_patience, asr_threshold=self.asr_threshold,
                               generator=g, batched=self.batched, progress=progress)
        self.labels, self.masks, self.patterns = res.labels.cpu(), res.masks.detach().cpu(), res.patterns.detach().cpu()
        self.l1, self.found, self.steps_run = res.l1.detach().double().cpu(), res.found.cpu(), res.steps.cpu()
        self.anomaly = anomaly_index(self.l1)
        self.asr = torch.tensor([trigger_asr(model, x, y, res.masks[i], res.patterns[i], int(t))
                                 for i, t in enumerate(res.labels.tolist())], dtype=torch.float64)
        self.fitted = True
        return self

    def total_steps(self) -> int:
        """Upper bound of the steps ``fit`` reports to ``progress`` (steps, times labels in the per-label loop)."""
        n = len(self.label_subset) if self.label_subset is not None else None
        return self.steps if self.batched or n is None else self.steps * n

    # -- results ---------------------------------------------------------------------------------
    @property
    def flagged(self) -> List[int]:
        """Labels whose small mask norm has an anomaly index above ``anomaly_threshold``."""
        self._check_fitted("reading flagged labels")
        return flagged_labels(self.l1, self.labels, self.anomaly_threshold, self.found)

    def max_anomaly(self) -> float:
        """The largest anomaly index among labels whose norm is below the median (0 when none is)."""
        self._check_fitted("reading the anomaly index")
        small = self.anomaly[self.l1 < median(self.l1)]
        return float(small.max()) if len(small) else 0.0

    def suspect_labels(self) -> List[int]:
        """The flagged labels, or the label with the smallest mask when none is flagged (mitigations use these)."""
        flagged = self.flagged
        return flagged if flagged else [int(self.labels[int(self.l1.argmin())])]

    def trigger(self, label: int) -> Tuple[Tensor, Tensor]:
        """``(mask [1, H, W], pattern [C, H, W])`` reversed for ``label``."""
        self._check_fitted("reading a trigger")
        hits = (self.labels == int(label)).nonzero().flatten()
        if len(hits) == 0:
            raise ValueError(f"label {label} was not inspected; inspected labels: {self.labels.tolist()}")
        i = int(hits[0])
        return self.masks[i], self.patterns[i]

    def report(self) -> List[Dict[str, Any]]:
        """Per label: ``label``, ``l1``, ``anomaly_index``, ``asr`` (of the reversed trigger), ``found``,
        ``flagged``, ``steps``."""
        self._check_fitted("reporting")
        flagged = set(self.flagged)
        return [{"label": int(t), "l1": float(self.l1[i]), "anomaly_index": float(self.anomaly[i]),
                 "asr": float(self.asr[i]), "found": bool(self.found[i]), "flagged": int(t) in flagged,
                 "steps": int(self.steps_run[i])} for i, t in enumerate(self.labels.tolist())]

    def overlap(self, true_mask: Tensor) -> List[Dict[str, float]]:
        """Per label, :func:`~lightning_backdoor.defenses.functional.mask_overlap` of its reversed mask with
        a known trigger region ``true_mask`` (``[H, W]``, nonzero where the trigger is)."""
        self._check_fitted("computing mask overlaps")
        return [{"label": int(t), **mask_overlap(self.masks[i], true_mask)} for i, t in enumerate(self.labels.tolist())]

    # -- mitigation (b): pruning -----------------------------------------------------------------
    def prune(
        self,
        model: nn.Module,
        clean: Any,
        layer: Optional[str] = None,
        step_fraction: float = 0.05,
        stop_asr: float = 0.1,
        max_fraction: float = 0.9,
        eval_clean: Optional[Tuple[Tensor, Tensor]] = None,
        eval_poisoned: Optional[Tuple[Tensor, Tensor]] = None,
        target: Optional[int] = None,
    ) -> Tuple[nn.Module, List[Dict[str, float]]]:
        """Prune the neurons the reversed trigger excites most until it stops working.

        Neurons of ``layer``'s output (channels of a conv map; default: the features entering the
        last ``nn.Linear``) are ranked by (mean activation on clean images stamped with the suspect
        labels' triggers) − (mean on clean images); ``step_fraction`` of them are pruned per step (set
        to zero by a forward hook on a **copy** of the model, or by zeroing the matching columns of
        the last linear layer by default) until the reversed triggers' ASR on ``clean`` falls below
        ``stop_asr`` or ``max_fraction`` is pruned.

        Returns:
            ``(pruned_copy, history)``; each history row holds ``pruned`` (neurons), ``fraction``,
            ``reversed_asr`` and, with ``eval_clean`` ``(x, y)`` / ``eval_poisoned`` ``(x', true y)`` +
            ``target``, ``ba`` / ``asr``. Step 0 is the unpruned model.
        """
        self._check_fitted("pruning")
        check_clean(clean, "NeuralCleanse.prune")
        step_fraction = check_probability(step_fraction, "step_fraction", low_open=True)
        stop_asr = check_probability(stop_asr, "stop_asr")
        max_fraction = check_probability(max_fraction, "max_fraction", low_open=True)
        device = model_device(model)
        use_input = layer is None
        layer = default_layer(model) if layer is None else layer
        find_layer(model, layer)
        x, y = collect_benign(clean, device=device, max_samples=self.max_samples, seed=self.seed)
        x = x.to(dtype=model_dtype(model))
        xt, yt = self.stamp_suspects(x, y)
        act_c = layer_activations(model, x, layer, use_input=use_input)
        act_t = layer_activations(model, xt, layer, use_input=use_input)
        order = rank_neurons(act_c, act_t)
        n = act_c.shape[1]
        work = copy.deepcopy(model)
        mod = find_layer(work, layer)
        hook = None
        if use_input:
            assert isinstance(mod, nn.Linear)
        else:
            hook = NeuronMask(mod, n, device)
        per_step = max(1, int(math.ceil(step_fraction * n)))
        history: List[Dict[str, float]] = []
        pruned = 0
        while True:
            row = {"pruned": float(pruned), "fraction": pruned / n, "reversed_asr": self._reversed_asr(work, xt, yt)}
            if eval_clean is not None:
                row["ba"] = accuracy(work, eval_clean[0].to(device), eval_clean[1].to(device))
            if eval_poisoned is not None and target is not None:
                xp, yp = eval_poisoned[0].to(device), eval_poisoned[1].to(device)
                keep = yp != int(target)
                row["asr"] = accuracy(work, xp[keep], torch.full_like(yp[keep], int(target)))
            history.append(row)
            if row["reversed_asr"] < stop_asr or pruned >= int(max_fraction * n) or pruned >= n:
                break
            nxt = order[pruned:min(pruned + per_step, n)]
            if use_input:
                with torch.no_grad():
                    mod.weight[:, nxt.to(mod.weight.device)] = 0.0
            else:
                hook.prune(nxt)
            pruned = min(pruned + per_step, n)
        return work, history

    def stamp_suspects(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Clean images stamped with each suspect label's trigger (images of that label left out), and the labels."""
        xs, ts = [], []
        for t in self.suspect_labels():
            m, p = self.trigger(t)
            keep = (y != t).to(x.device)
            xs.append(stamp(x[keep], m.to(x.device, x.dtype), p.to(x.device, x.dtype)))
            ts.append(torch.full((int(keep.sum()),), t, dtype=torch.long, device=x.device))
        return torch.cat(xs), torch.cat(ts)

    @staticmethod
    def _reversed_asr(model: nn.Module, xt: Tensor, yt: Tensor) -> float:
        return accuracy(model, xt, yt)

    # -- state -----------------------------------------------------------------------------------
    def hparams(self) -> Dict[str, Any]:
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "init_cost": self.init_cost,
                "cost_multiplier": self.cost_multiplier, "patience": self.patience,
                "early_stop_patience": self.early_stop_patience, "asr_threshold": self.asr_threshold,
                "anomaly_threshold": self.anomaly_threshold, "max_samples": self.max_samples,
                "labels": self.label_subset, "batched": self.batched, "seed": self.seed}

    _STATE = ("labels", "masks", "patterns", "l1", "anomaly", "asr", "found", "steps_run")

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"fitted": self.fitted}
        for k in self._STATE:
            v = getattr(self, k)
            state[k] = v.clone() if isinstance(v, Tensor) else None
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k in self._STATE:
            v = state.get(k)
            if v is not None and not isinstance(v, Tensor):
                raise TypeError(f"NeuralCleanse state {k!r} must be a Tensor or None, got {type(v).__name__}")
            setattr(self, k, v)
        if self.fitted and any(getattr(self, k) is None for k in self._STATE):
            missing = [k for k in self._STATE if getattr(self, k) is None]
            raise ValueError(f"a fitted NeuralCleanse state must contain {missing}")
