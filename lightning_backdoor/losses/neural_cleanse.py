"""Neural Cleanse unlearning as a fine-tuning loss term (a defence, not an attack).

Wang et al., "Neural Cleanse", IEEE S&P 2019, Sec. VI-C: fine-tune the model for one epoch on a
small clean share of the training data (10%) with the reversed trigger stamped on 20% of it and
the labels kept correct, so the model unlearns the trigger → target association.

    term = NeuralCleanseUnlearning(stamp_rate=0.2)           # reverse-engineers in fit (BackdoorClassifier does it)
    loss = term.main_weight * ce(model(x), y) + term(model, x, y, poisoned, original_y)

configs/neural_cleanse_unlearn.yaml fine-tunes the quickstart checkpoint this way on the data
module's held-apart clean split (:class:`~lightning_backdoor.data.DefenseFinetuneDataModule`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import evaluating
from ..validation import check_bool, check_probability, check_seed
from .base import LOSSES, LossTerm


@LOSSES.register("neural_cleanse_unlearning")
class NeuralCleanseUnlearning(LossTerm):
    """Unlearning with the reversed trigger: ``(1 − p)·CE(f(x), y) + p·CE(f(stamp(x_S)), y_S)``.

    ``p = stamp_rate`` (paper: 0.2). Each step, a random ``p`` share ``S`` of the batch (drawn from
    the term's own seeded generator; at least one image) is stamped with the reversed trigger of one
    suspect label (flagged by Neural Cleanse, or the label with the smallest mask when none is
    flagged; chosen at random per image when there are several) and trained with its **true** label.
    The stamped images go through the model with BatchNorm on its running statistics (eval mode, modes
    restored): a train-mode pass over the few stamped images would normalise them with their own noisy
    batch statistics and pull the running statistics towards them; dropout is off for them too.
    ``main_weight = 1 − p`` scales the ordinary loss, so in expectation the batch is the paper's mix
    of 80% clean and 20% stamped images.

    ``fit(model, benign)`` runs :class:`~lightning_backdoor.defenses.NeuralCleanse` (``cleanse``) on
    the benign data; :class:`~lightning_backdoor.BackdoorClassifier` calls it at the start of
    ``fit`` with the data module's held-apart clean split. The triggers are kept as extra state, so
    a resumed fine-tune keeps them (``weights_only``-safe tensors).

    Args:
        cleanse: the :class:`~lightning_backdoor.defenses.NeuralCleanse` to reverse-engineer with
            (default: one with its defaults).
        stamp_rate: share of each batch stamped with the reversed trigger, in ``(0, 1)``.
        seed: seeds the choice of stamped images.
        refit: reverse-engineer in ``fit`` even when ``cleanse`` is already fitted (``False``: reuse it).

    Example:
        >>> from lightning_backdoor.defenses import NeuralCleanse
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> term = NeuralCleanseUnlearning(NeuralCleanse(steps=5, batch_size=4))
        >>> term = term.fit(net, (torch.rand(12, 1, 4, 4), torch.arange(12) % 3))
        >>> x, y = torch.rand(5, 1, 4, 4), torch.arange(5) % 3
        >>> float(term(net, x, y, torch.zeros(5, dtype=torch.bool), y).detach()) >= 0
        True
    """

    name = "neural_cleanse_unlearning"
    requires_fit = True

    def __init__(self, cleanse: Any = None, stamp_rate: float = 0.2, seed: int = 0, refit: bool = True) -> None:
        super().__init__()
        from ..defenses.neural_cleanse import NeuralCleanse

        if cleanse is None:
            cleanse = NeuralCleanse()
        if not isinstance(cleanse, NeuralCleanse):
            raise TypeError(f"cleanse must be a NeuralCleanse instance or None, got {type(cleanse).__name__}")
        self.cleanse = cleanse
        self.stamp_rate = check_probability(stamp_rate, "stamp_rate", low_open=True, high_open=True)
        self.seed = check_seed(seed)
        self.refit = check_bool(refit, "refit")
        self.main_weight = 1.0 - self.stamp_rate
        self.generator = torch.Generator().manual_seed(self.seed)
        self.masks: Optional[Tensor] = None
        self.patterns: Optional[Tensor] = None
        self.suspects: Optional[Tensor] = None
        self.fitted = False

    def fit(self, model: nn.Module, benign: Any) -> "NeuralCleanseUnlearning":
        """Reverse-engineer the triggers on ``benign`` (``refit=False``: reuse a fitted ``cleanse``), keep the suspects'."""
        if self.refit or not self.cleanse.fitted:
            self.cleanse.fit(model, benign)
        suspects = self.cleanse.suspect_labels()
        pairs = [self.cleanse.trigger(t) for t in suspects]
        self.masks = torch.stack([m for m, _ in pairs])
        self.patterns = torch.stack([p for _, p in pairs])
        self.suspects = torch.tensor(suspects, dtype=torch.long)
        self.fitted = True
        return self

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, poisoned: Tensor, original_y: Tensor,
                target: Union[int, Tensor, None] = None, logits: Optional[Tensor] = None) -> Optional[Tensor]:
        if not self.fitted or self.masks is None:
            raise RuntimeError("NeuralCleanseUnlearning must be fitted first: term.fit(model, benign) reverse-engineers "
                               "the trigger (BackdoorClassifier does it at the start of fit)")
        y, poisoned, original_y = self._check_batch(x, y, poisoned, original_y)
        n = len(x)
        if n == 0:
            self._skip()
            return None
        k = max(1, int(round(self.stamp_rate * n)))
        chosen = torch.randperm(n, generator=self.generator)[:k]
        which = torch.randint(len(self.masks), (k,), generator=self.generator)
        dev = x.device
        m = self.masks[which].to(dev, x.dtype)
        p = self.patterns[which].to(dev, x.dtype)
        xs = x[chosen.to(dev)] * (1.0 - m) + m * p
        # BatchNorm on running statistics for the few stamped images: a train-mode pass over ~p*N images would
        # normalise them with their own noisy statistics and drag the running statistics towards them
        with evaluating(model, grad=True):
            out = model(xs)
        return self.stamp_rate * F.cross_entropy(out, y[chosen.to(dev)])

    def get_extra_state(self) -> Dict[str, Any]:
        return {"fitted": bool(self.fitted), "masks": self.masks, "patterns": self.patterns, "suspects": self.suspects,
                "rng_state": self.generator.get_state(), "cleanse": self.cleanse.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.masks, self.patterns, self.suspects = state.get("masks"), state.get("patterns"), state.get("suspects")
        self.fitted = bool(state.get("fitted", False)) and self.masks is not None
        if state.get("rng_state") is not None:
            self.generator.set_state(state["rng_state"])
        if state.get("cleanse") is not None:
            self.cleanse.load_state_dict(state["cleanse"])

    def extra_repr(self) -> str:
        return f"stamp_rate={self.stamp_rate}, main_weight={self.main_weight}, seed={self.seed}"
