"""The batch-level attack interface: poisoning on the device, inside the training step.

A :class:`BatchAttack` is an ``nn.Module`` for attacks whose trigger is not a fixed function of the
data but is trained together with the classifier (IAD's generator; later LIRA, WB). It is given to
the data module like any attack (``BackdoorDataModule(attack=IAD())``) or to the classifier
(``BackdoorClassifier(batch_attack=IAD())``); either way:

- the **training set stays clean** in the data module; :class:`~lightning_backdoor.modules.BackdoorClassifier`
  calls :meth:`BatchAttack.poison_batch` on every training batch, on the model's device, and trains
  on what it returns;
- the attack may own **trainable parts with their own optimisers and schedules**
  (:meth:`BatchAttack.configure_optimizers`); then the classifier switches to Lightning's manual
  optimisation, steps the classifier's optimiser and the attack's optimisers of the current
  :meth:`BatchAttack.phase`, and steps every scheduler once per epoch in which its optimiser stepped;
- a **pre-training phase** (``phase() == "pretrain"``) trains only the attack's parts on
  :meth:`BatchAttack.pretrain_loss` (IAD's mask generator); the classifier is not touched;
- the **poisoned evaluation sets** hold the clean non-target images (``y`` = target, ``original_y``
  = true label, ``poisoned`` = True) and the trigger is applied on the device by whoever evaluates them
  (the classifier's ASR, ``BackdoorMetrics``, ``DetectionCallback``), always with the *current*
  generator: :meth:`BatchAttack.trigger` (eval mode, no gradients);
- everything trainable lives in the module's state dict, so it is saved in every checkpoint,
  restored on resume and by ``BackdoorClassifier.load_from_checkpoint``.

Subclasses implement :meth:`BatchAttack.build`, :meth:`BatchAttack.apply_trigger` and
:meth:`BatchAttack.poison_batch`; optional: :meth:`BatchAttack.attack_loss`,
:meth:`BatchAttack.configure_optimizers`, :meth:`BatchAttack.phase` and :meth:`BatchAttack.pretrain_loss`.
Like :class:`~lightning_backdoor.attacks.Attack`, its core never imports Lightning.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ..registry import Registry
from ..utils import evaluating
from ..validation import check_images

BATCH_ATTACKS = Registry("batch attack")


def create_batch_attack(name: str, **kwargs: Any) -> "BatchAttack":
    """Build a registered batch-level attack, e.g. ``create_batch_attack("iad", backdoor_share=0.1)``."""
    return BATCH_ATTACKS.create(name, **kwargs)


def list_batch_attacks(pattern: str = "*") -> list[str]:
    """Names of registered batch-level attacks matching an fnmatch ``pattern``."""
    return BATCH_ATTACKS.list(pattern)


class AttackOptimizer(NamedTuple):
    """One optimiser of a batch attack: ``phase`` is ``"pretrain"`` or ``"train"`` (when it steps);
    ``scheduler`` (or None) is stepped once per epoch, in both phases."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any] = None
    phase: str = "train"


class PoisonedBatch(NamedTuple):
    """What :meth:`BatchAttack.poison_batch` returns: the training inputs and labels, and masks saying
    which samples are backdoor (label -> target) and cross/cover samples (trigger-like, true label kept)."""

    x: Tensor
    y: Tensor
    poisoned: Tensor
    cross: Tensor
    extras: Dict[str, Tensor]


class BatchAttack(nn.Module):
    """Base class of attacks that poison batches on the device and may train with the classifier.

    Example:
        >>> class Darken(BatchAttack):
        ...     name = "darken"
        ...     def apply_trigger(self, x):
        ...         return x * 0.5
        ...     def poison_batch(self, x, y, target):
        ...         k = len(x) // 2
        ...         xp = torch.cat([self.apply_trigger(x[:k]), x[k:]])
        ...         yp = torch.cat([torch.full_like(y[:k], target), y[k:]])
        ...         mask = torch.arange(len(x), device=x.device) < k
        ...         return PoisonedBatch(xp, yp, mask, torch.zeros_like(mask), {})
        >>> out = Darken().poison_batch(torch.ones(4, 1, 2, 2), torch.tensor([1, 2, 3, 4]), 0)
        >>> out.y.tolist(), out.poisoned.tolist()
        ([0, 0, 3, 4], [True, True, False, False])
    """

    name: str = "batch_attack"
    #: The data module builds the poisoned evaluation sets without applying anything (the trigger is
    #: applied on the device); checked by consumers through this flag.
    triggers_on_device: bool = True

    def build(self, channels: int, height: int, width: int) -> "BatchAttack":
        """Create shape-dependent parts (generators) for ``[C, H, W]`` images; called by the data module."""
        return self

    def apply_trigger(self, x: Tensor) -> Tensor:
        """The test-time trigger on a ``[N, C, H, W]`` batch in ``[0, 1]`` (differentiable; subclasses implement it)."""
        raise NotImplementedError

    def trigger(self, x: Tensor) -> Tensor:
        """The current trigger for evaluation: eval mode, no gradients, on ``x``'s device.

        Example:
            >>> class Ones(BatchAttack):
            ...     def apply_trigger(self, x):
            ...         return torch.ones_like(x)
            >>> Ones().trigger(torch.zeros(1, 1, 2, 2)).sum().item()
            4.0
        """
        x = check_images(x, "x", allow_single=False)
        with evaluating(self), torch.no_grad():
            return self.apply_trigger(x)

    def poison_batch(self, x: Tensor, y: Tensor, target: int) -> PoisonedBatch:
        """Poison a training batch (on its device): see :class:`PoisonedBatch`."""
        raise NotImplementedError

    def attack_loss(self, x: Tensor, y: Tensor, batch: PoisonedBatch) -> Optional[Tensor]:
        """Extra loss terms on the attack's own parts (added to the classifier's loss); None: none."""
        return None

    def configure_optimizers(self) -> List[AttackOptimizer]:
        """The attack's optimisers (empty: nothing trainable, automatic optimisation is kept)."""
        return []

    def phase(self) -> str:
        """``"pretrain"`` (train only the attack's parts on :meth:`pretrain_loss`) or ``"train"``."""
        return "train"

    def pretrain_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss of a pre-training step (only called in the ``"pretrain"`` phase)."""
        raise NotImplementedError(f"{type(self).__name__} has no pre-training phase")

    def step_done(self, phase: str) -> None:
        """Called after each training step (attacks count their steps here, in buffers, for exact resume)."""

    def hparams(self) -> Dict[str, Any]:
        """Attack parameters to record with a run (JSON-serialisable)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())


def split_counts(n: int, backdoor_share: float, cross_share: float) -> Tuple[int, int]:
    """Numbers of backdoor and cross samples in a batch of ``n``: ``round(share * n)`` each, the backdoor
    count at least 1 (a batch of 1 holds one backdoor sample), together at most ``n``.

    Example:
        >>> split_counts(128, 0.1, 0.1), split_counts(3, 0.1, 0.1)
        ((13, 13), (1, 0))
    """
    n_bd = min(n, max(1, int(round(backdoor_share * n))))
    n_cross = min(n - n_bd, int(round(cross_share * n)))
    return n_bd, n_cross
