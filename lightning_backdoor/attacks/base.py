"""The attack interface every trigger implements.

An ``Attack`` is an ``nn.Module`` whose ``forward`` maps clean images in pixel space ``[0, 1]``
(``[N, C, H, W]`` or a single ``[C, H, W]``) to triggered images of the same shape, on the input's
device. Trigger state (patches, patterns, warping fields) lives in buffers, so it is saved in
checkpoints and restored on resume; state that depends on the image shape is materialised
deterministically from ``seed`` on first use (or eagerly via ``build(channels, height, width)``).

How the data pipeline uses an attack (see ``lightning_backdoor.data.PoisonedDataset``):

- ``dirty_label=True``: a seeded ``rate`` share of the *non-target* samples is triggered and
  relabelled to the target. ``dirty_label=False`` (clean-label attacks, later): only samples
  whose label *is* the target are triggered and labels are kept.
- ``cover_ratio > 0``: a further ``cover_ratio * rate`` share of samples gets ``cover(x)`` and keeps
  its true label (WaNet's noise mode; Adap-Patch/Blend's regularisation samples).
- ``requires_fit``: attacks that need data or a surrogate model before they can trigger
  (LC, TUAP, NARCISSUS, ISSBA's encoder) implement ``fit(dataset, target, model=None)``; the
  datamodule calls it once before building poisoned sets.
- Attacks whose trigger generator trains jointly with the classifier (IAD) or that edit weights
  (SRA) will hook into the LightningModule rather than the dataset; the interface leaves room
  for them (``trainable`` flag) without changing existing attacks.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor, nn

from .._validation import check_images
from ..registry import Registry

ATTACKS = Registry("attack")


def create_attack(name: str, **kwargs: Any) -> "Attack":
    """Build a registered attack, e.g. ``create_attack("badnets", patch_size=3, seed=0)``."""
    return ATTACKS.create(name, **kwargs)


def list_attacks(pattern: str = "*") -> list[str]:
    """Names of registered attacks matching an fnmatch ``pattern``."""
    return ATTACKS.list(pattern)


class Attack(nn.Module):
    """Base class of triggers. Subclasses implement ``apply(x)`` on a checked ``[N, C, H, W]`` batch."""

    name: str = "attack"
    dirty_label: bool = True
    requires_fit: bool = False
    trainable: bool = False
    cover_ratio: float = 0.0

    def forward(self, x: Tensor) -> Tensor:
        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = self.apply(xb)
        return out[0] if single else out

    def apply(self, x: Tensor) -> Tensor:  # noqa: D401 - batched core
        raise NotImplementedError

    def cover(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cover (label-keeping) variant for ``cover_ratio > 0`` attacks; identity otherwise."""
        return x

    def build(self, channels: int, height: int, width: int) -> "Attack":
        """Materialise shape-dependent trigger state now (and validate it against the image shape)."""
        return self

    def fit(self, dataset: Any, target: int, model: nn.Module | None = None) -> "Attack":
        """Prepare the trigger from data (clean-label/optimised attacks). Default: nothing to do."""
        return self

    def hparams(self) -> Dict[str, Any]:
        """Attack parameters to record with a run (JSON-serialisable)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
