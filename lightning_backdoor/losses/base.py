"""Extra loss terms a backdoor attacker adds to the vanilla objective (adaptive attacks).

A training step that uses terms ``T_1 … T_m`` minimises

    (Π_j T_j.main_weight) · L_bd  +  Σ_j T_j(model, x, y, poisoned, original_y, target, logits)

where ``L_bd`` is the vanilla poisoned-training loss (docs/methods.md §1). Each term logs as
``train/loss/{name}``. A term returns None when the batch holds none of the samples it needs
(e.g. no poisoned sample); it then counts the batch in ``skipped`` instead of returning NaN.

    term = create_loss("ibd_psc_adaptive", design=1, alpha=0.5, k=3)
    extra = term(model, x, y, poisoned, original_y, target, logits=logits)
    loss = term.main_weight * l_bd + (extra if extra is not None else 0)
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..registry import Registry

LOSSES = Registry("loss")


def create_loss(name: str, **kwargs: Any) -> "LossTerm":
    """Build a registered loss term by name, e.g. ``create_loss("scale_up_adaptive", weight=0.5)``."""
    return LOSSES.create(name, **kwargs)


def list_losses(pattern: str = "*") -> list[str]:
    """Names of registered loss terms matching an fnmatch ``pattern``."""
    return LOSSES.list(pattern)


class LossTerm(nn.Module):
    """Base class of the adaptive-attack loss terms.

    Attributes:
        name: registry key; the trainer logs the term as ``train/loss/{name}``.
        main_weight: factor the trainer applies to the vanilla loss ``L_bd`` (with several terms,
            the product of their ``main_weight``).
        requires_fit: whether ``fit(model, benign)`` must run before training (e.g. to choose a layer).
        skipped: number of batches for which the term returned None (none of the samples it needs).

    The model is passed to every call and never stored, so a term can be a submodule of the
    LightningModule without registering the network twice.
    """

    name: str = "loss_term"
    requires_fit: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.main_weight = 1.0
        self.skipped = 0

    def fit(self, model: nn.Module, benign: Any) -> "LossTerm":
        """Prepare the term on benign data (DataLoader or ``(x, y)`` pair). Default: nothing to do."""
        return self

    def forward(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        poisoned: Tensor,
        original_y: Tensor,
        target: Union[int, Tensor, None] = None,
        logits: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        """The term's weighted contribution to the loss, or None (and ``skipped += 1``).

        Args:
            model: the network being trained (in the caller's mode).
            x: the batch in ``[0, 1]``, already triggered where ``poisoned``.
            y: the training labels (the target for dirty-label poisoned samples).
            poisoned: bool mask ``[N]`` of poisoned samples.
            original_y: true labels before relabelling ``[N]``.
            target: the attack's target label (an int, or per-sample labels ``[N]``).
            logits: ``model(x)`` if the caller already computed it.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"main_weight={self.main_weight}"

    # -- helpers for subclasses ------------------------------------------------------------------
    def _skip(self) -> None:
        self.skipped += 1

    @staticmethod
    def _check_batch(x: Tensor, y: Tensor, poisoned: Tensor, original_y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Cheap shape/dtype checks (no device sync); returns ``(y, poisoned, original_y)`` as long/bool/long."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be an image batch [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
        n = x.shape[0]
        for name, t in (("y", y), ("poisoned", poisoned), ("original_y", original_y)):
            if not isinstance(t, Tensor) or t.shape != (n,):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a Tensor of shape [{n}] (one entry per image), got {shape}")
        if poisoned.dtype != torch.bool:
            raise TypeError(f"poisoned must be a bool mask, got dtype {poisoned.dtype}")
        return y.long(), poisoned, original_y.long()
