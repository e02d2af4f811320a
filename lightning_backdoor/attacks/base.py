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
- **Train-time and test-time triggers may differ.** ``forward``/``apply_trigger(x)`` is the
  *test-time* trigger (poisoned validation/test sets, ASR, detectors, W&B previews). Poisoned
  *training* samples get ``train_trigger(x, generator)``, whose default is the test-time trigger;
  PhysicalBA overrides it with random physical transforms, Adap-Patch/Adap-Blend with a random
  subset of the trigger's pieces.
- ``clean_train_transform(x, generator)``: what the *clean* training samples (neither poisoned nor
  cover) get; identity by default. BATT rotates/shifts them mildly so that only the trigger's
  exact transformation is a shortcut to the target.
- ``sample_seeded``: when True, the data pipeline hands ``train_trigger``, ``cover`` and
  ``clean_train_transform`` a CPU generator seeded from ``(poison seed, dataset index)``, so each
  sample's random draw is fixed: the same every epoch, with any number of workers and after a
  resume. When False (WaNet), they get ``generator=None`` and draw from the global RNG (restored
  on resume by the data module).
- ``default_rate``: the poison rate of the attack's paper setting, used by the benchmark and the
  gallery when no rate is given (the data module's ``rate`` always decides in a run).
- ``requires_fit``: attacks that need data or a surrogate model before they can trigger
  (LC, TUAP, NARCISSUS, ISSBA's encoder) implement ``fit(dataset, target, model=None, indices=None)``;
  the datamodule calls it once in ``setup``, after choosing the poisoned index set and before any
  poisoned sample is read, passing those ``indices`` (positions in the training set it is given).
  See :mod:`lightning_backdoor.attacks.fitted` for the surrogate models and the stored state.
- ``per_sample``: the trigger depends on the sample (LC's PGD images, ISSBA's encoder output).
  The training-time poisoned image of a sample is ``poison_train(x, index)`` — stored per
  dataset index by ``fit`` (``uint8`` buffers) — and poisoned evaluation sets apply ``forward``
  to whole batches at once instead of one image at a time. ``poison_train`` defaults to
  ``forward(x)`` for every other attack; for a ``per_sample`` attack it replaces ``train_trigger``.
- Attacks whose trigger generator trains jointly with the classifier (IAD) or that edit a trained
  model's weights (SRA) are other kinds of component with seams of their own; this interface is
  for triggers applied to data.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from ..validation import check_images
from ..registry import Registry

ATTACKS = Registry("attack")


def create_attack(name: str, **kwargs: Any) -> "Attack":
    """Build a registered attack, e.g. ``create_attack("badnets", patch_size=3, seed=0)``."""
    return ATTACKS.create(name, **kwargs)


def list_attacks(pattern: str = "*") -> list[str]:
    """Names of registered attacks matching an fnmatch ``pattern``."""
    return ATTACKS.list(pattern)


def _check_trigger_tensor(t: Any, name: str) -> Tensor:
    """Check a user trigger tensor (patch, mask, pattern): ``[C, h, w]`` or ``[h, w]``, float, finite, in [0, 1].

    Returns a detached ``[C, h, w]`` copy (``[h, w]`` becomes ``[1, h, w]``, broadcast over channels).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [C, h, w] or [h, w] in [0, 1], got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [C, h, w] or [h, w], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    t = t.unsqueeze(0) if t.dim() == 2 else t
    check_images(t, name, allow_single=True)
    return t.detach().clamp(0, 1).clone()


def _check_image_shape(channels: Any, height: Any, width: Any) -> Tuple[int, int, int]:
    """Check the ``build(channels, height, width)`` arguments are positive ints."""
    for name, v in (("channels", channels), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return channels, height, width


class Attack(nn.Module):
    """Base class of triggers. Subclasses implement ``apply_trigger(x)`` on a checked ``[N, C, H, W]`` batch."""

    name: str = "attack"
    dirty_label: bool = True
    requires_fit: bool = False
    cover_ratio: float = 0.0
    sample_seeded: bool = False
    default_rate: float = 0.1
    per_sample: bool = False
    #: Buffers registered as ``None`` and materialised on first use / ``build``. A fresh instance
    #: adopts them from a ``state_dict`` that holds them, so checkpoints restore the exact trigger.
    _lazy_buffers: Tuple[str, ...] = ()

    def forward(self, x: Tensor) -> Tensor:
        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = self.apply_trigger(xb)
        return out[0] if single else out

    def apply_trigger(self, x: Tensor) -> Tensor:
        """The batched trigger on a checked ``[N, C, H, W]`` batch in ``[0, 1]`` (subclasses implement it).

        Named ``apply_trigger``, not ``apply``: ``nn.Module.apply(fn)`` recurses into submodules, and
        ``parent.apply(init_fn)`` must keep working when an attack is a submodule.
        """
        raise NotImplementedError

    def train_trigger(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The training-time trigger of poisoned training samples (default: the test-time trigger).

        Args:
            x: clean images ``[N, C, H, W]`` or ``[C, H, W]`` in ``[0, 1]``.
            generator: random source of attacks with a random training-time trigger (any device;
                ``None``: the global RNG). Ignored by attacks whose two triggers are the same.

        Example:
            >>> import torch
            >>> from lightning_backdoor.attacks import BadNets
            >>> a, x = BadNets(seed=0), torch.rand(2, 1, 8, 8)
            >>> torch.equal(a.train_trigger(x), a(x))
            True
        """
        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = self.apply_train_trigger(xb, generator)
        return out[0] if single else out

    def apply_train_trigger(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Batched training-time trigger on a checked ``[N, C, H, W]`` batch; default ``apply_trigger(x)``."""
        return self.apply_trigger(x)

    def clean_train_transform(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What clean training images (neither poisoned nor cover) get before augmentation; identity by default.

        Same arguments as :meth:`train_trigger`.
        """
        x = check_images(x, "x", allow_single=True)
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = self.apply_clean_train_transform(xb, generator)
        return out[0] if single else out

    def apply_clean_train_transform(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Batched form of :meth:`clean_train_transform` (subclasses override it); identity by default."""
        return x

    @property
    def transforms_clean_images(self) -> bool:
        """Whether this attack changes clean training images (it overrides ``apply_clean_train_transform``)."""
        return type(self).apply_clean_train_transform is not Attack.apply_clean_train_transform

    @property
    def differs_at_train_time(self) -> bool:
        """Whether the training-time trigger differs from the test-time one (``apply_train_trigger`` overridden)."""
        return type(self).apply_train_trigger is not Attack.apply_train_trigger

    def cover(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cover (label-keeping) variant for ``cover_ratio > 0`` attacks; identity otherwise."""
        return x

    def build(self, channels: int, height: int, width: int) -> "Attack":
        """Materialise shape-dependent trigger state now (and validate it against the image shape)."""
        return self

    def fit(self, dataset: Any, target: int, model: nn.Module | None = None, *, indices: Any = None) -> "Attack":
        """Prepare the trigger from data (clean-label/optimised attacks). Default: nothing to do.

        ``indices``: the positions of ``dataset`` that will be poisoned at training time (per-sample
        attacks store those samples' poisoned images). Implementations are idempotent: a fitted
        attack (also one restored from a checkpoint) returns at once for the same indices.
        """
        return self

    def poison_train(self, x: Tensor, index: int) -> Tensor:
        """The training-time poisoned version of sample ``index`` (its position in the fitted dataset).

        Default: ``forward(x)``; per-sample attacks return the image ``fit`` stored for ``index``.
        """
        return self(x)

    def hparams(self) -> Dict[str, Any]:
        """Attack parameters to record with a run (JSON-serialisable)."""
        return {}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for name in self._lazy_buffers:
            key = prefix + name
            if key in state_dict and self._buffers.get(name) is None and isinstance(state_dict[key], Tensor):
                self._buffers[name] = state_dict[key].detach().clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
