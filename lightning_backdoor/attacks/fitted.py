"""Shared machinery of the attacks prepared from data: surrogate models, data access, per-sample triggers.

``FittedAttack`` is the base of Label-Consistent, TUAP, NARCISSUS and ISSBA. It adds to
:class:`~lightning_backdoor.attacks.Attack`:

- **the surrogate model** (``surrogate=``): an ``nn.Module`` used as it is (optionally filled with
  ``surrogate_weights``), a registered model name (``"small_cnn"``, ``"resnet20"``, ...) built for
  the data's channels and classes, or a path to weights of the default architecture. Weights are
  always read with ``torch.load(..., weights_only=True)``
  (:func:`~lightning_backdoor.checkpoints.load_net_weights`). Without weights the surrogate is
  **trained by the attack on the same data**: ``surrogate_epochs`` epochs of Adam (lr 3e-3, batch
  64) on a seeded random subset of ``surrogate_samples`` training images, the default
  architecture being ``SmallCNN(width=16)``. ``surrogate_width`` (if given) is passed as the
  architecture's ``width`` (default SmallCNN or a named model; ``None``: its default). Training is seeded from ``seed`` and
  leaves the global RNG alone. The surrogate is *not* part of the attack's ``state_dict`` (only
  the trigger it produced is), so checkpoints do not carry it.
- **per-sample triggers keyed by dataset index** (``per_sample = True``): ``fit(..., indices=...)``
  computes the training-time poisoned images of exactly those samples in batches on the work
  device and stores them as ``uint8`` buffers (``sample_index`` ``[K]``, ``sample_images``
  ``[K, C, H, W]``), so a checkpoint grows by the poisoned subset as ``uint8`` and a resumed run
  or ``from_checkpoint`` reuses the very same images. :meth:`poison_train` looks them up.
- ``fit`` is idempotent: called again with the same indices on a fitted attack (e.g. after its
  state was restored from a checkpoint) it returns at once.

YAML (LightningCLI / jsonargparse), a surrogate trained by the attack::

    attack:
      class_path: lightning_backdoor.attacks.LabelConsistent
      init_args: {surrogate: small_cnn, surrogate_epochs: 2, surrogate_samples: 2000}

or a given one (weights loaded safely)::

      init_args:
        surrogate: {class_path: lightning_backdoor.models.CifarResNet, init_args: {num_blocks: [2, 2, 2, 2]}}
        surrogate_weights: checkpoints/clean_resnet18.ckpt
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..utils import evaluating, preserved_rng
from ..validation import check_images, check_positive_int, check_seed
from . import adversarial as ADV
from .base import Attack

SurrogateSpec = Union[nn.Module, str, None]


def dataset_images(dataset: Dataset, indices: Sequence[int] | Tensor, name: str = "dataset") -> Tensor:
    """The images ``dataset[i][0]`` for ``i`` in ``indices``, stacked as a float ``[K, C, H, W]`` batch in [0, 1]."""
    idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
    if not idx:
        raise ValueError(f"no samples of {name} selected")
    return check_images(torch.stack([dataset[i][0] for i in idx]), f"{name} images", allow_single=False)


def dataset_targets(dataset: Dataset) -> Tensor:
    """All labels of ``dataset`` (see :func:`lightning_backdoor.data.dataset_labels`)."""
    from ..data.poisoned import dataset_labels

    return dataset_labels(dataset)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_surrogate(model: Any, x: Tensor, num_classes: int, name: str = "surrogate") -> nn.Module:
    """Check ``model`` takes images like ``x`` (``[N, C, H, W]``) and outputs at least ``num_classes`` logits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, a registered model name or a weights path, "
                        f"got {type(model).__name__}")
    c, h, w = x.shape[1:]
    in_ch = getattr(model, "in_channels", None)
    if isinstance(in_ch, int) and in_ch != c:
        raise ValueError(f"{name} takes {in_ch}-channel images but the data has {c} channels ({c}x{h}x{w}); "
                         f"use a surrogate built with in_channels={c}")
    device = next((p.device for p in model.parameters()), x.device)
    try:
        with evaluating(model):
            out = model(x[:2].to(device))
    except RuntimeError as e:
        raise ValueError(f"{name} cannot take the data's {c}x{h}x{w} images (in_channels/input size do not fit): "
                         f"{str(e).splitlines()[0]}") from e
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(f"{name} must output logits of shape [N, num_classes], got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    if out.shape[1] < num_classes:
        raise ValueError(f"{name} outputs {out.shape[1]} logits but the data has {num_classes} classes "
                         f"(labels 0..{num_classes - 1}); use a surrogate with num_classes={num_classes}")
    return model


class FittedAttack(Attack):
    """Base of attacks prepared from data or a surrogate (see the module docstring).

    Subclasses implement ``_fit(dataset, labels, target, indices, model)`` and, for per-sample
    attacks, ``_train_images(x, indices)`` — the training-time poisoned images of a batch.
    """

    requires_fit = True
    per_sample = False
    _lazy_buffers: Tuple[str, ...] = ("sample_index", "sample_images")
    sample_index: Optional[Tensor]
    sample_images: Optional[Tensor]

    def __init__(self, surrogate: SurrogateSpec = None, surrogate_weights: Optional[str] = None,
                 surrogate_epochs: int = 2, surrogate_samples: Optional[int] = 2000,
                 surrogate_width: Optional[int] = None,
                 batch_size: int = 256, device: Optional[str] = None, seed: int = 0) -> None:
        super().__init__()
        if surrogate is not None and not isinstance(surrogate, (nn.Module, str)):
            raise TypeError("surrogate must be an nn.Module, a registered model name, a path to weights or None "
                            f"(train one), got {type(surrogate).__name__}")
        if surrogate_weights is not None and not isinstance(surrogate_weights, (str, os.PathLike)):
            raise TypeError(f"surrogate_weights must be a path or None, got {type(surrogate_weights).__name__}")
        # kept out of the module tree: the surrogate is a tool of ``fit``, not trigger state
        self.__dict__["_surrogate"] = surrogate
        self.surrogate_weights = None if surrogate_weights is None else os.fspath(surrogate_weights)
        self.surrogate_epochs = check_positive_int(surrogate_epochs, "surrogate_epochs", allow_zero=True)
        self.surrogate_samples = None if surrogate_samples is None else check_positive_int(
            surrogate_samples, "surrogate_samples")
        self.surrogate_width = None if surrogate_width is None else check_positive_int(surrogate_width, "surrogate_width")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = None if device is None else str(torch.device(device))
        self.seed = check_seed(seed)
        self.register_buffer("sample_index", None)
        self.register_buffer("sample_images", None)
        self.fit_info: Dict[str, Any] = {}

    # -- the surrogate -------------------------------------------------------------------------------
    @property
    def surrogate(self) -> SurrogateSpec:
        """The surrogate as given (module, name, path or None)."""
        return self.__dict__["_surrogate"]

    def _work_device(self, model: Optional[nn.Module] = None) -> torch.device:
        if model is not None:
            p = next(model.parameters(), None)
            if p is not None:
                return p.device
        return torch.device(self.device) if self.device is not None else _default_device()

    def _is_path(self, spec: str) -> bool:
        return os.path.sep in spec or spec.endswith((".pt", ".pth", ".ckpt")) or os.path.exists(spec)

    def build_surrogate(self, dataset: Dataset, labels: Tensor, num_classes: int,
                        model: Optional[nn.Module] = None) -> nn.Module:
        """The surrogate for ``fit``: ``model`` if given, else the configured one (trained on the data without weights)."""
        from ..checkpoints import load_net_weights
        from ..models import create_model

        x0 = dataset_images(dataset, [0])
        c = int(x0.shape[1])
        spec = model if model is not None else self.surrogate
        weights = self.surrogate_weights
        if isinstance(spec, str) and self._is_path(spec):
            spec, weights = None, spec
        trained = False
        if isinstance(spec, nn.Module):
            net = spec
        else:
            with preserved_rng():
                torch.manual_seed(self.seed)
                width = {} if self.surrogate_width is None else {"width": self.surrogate_width}
                if spec is None:
                    net = create_model("small_cnn", num_classes=num_classes, in_channels=c, **(width or {"width": 16}))
                else:
                    net = create_model(spec, num_classes=num_classes, in_channels=c, **width)
            net = net.to(self._work_device())
            trained = weights is None
        if weights is not None:
            load_net_weights(net, weights)
        check_surrogate(net, x0, num_classes)
        if trained and self.surrogate_epochs > 0:
            idx = _seeded_subset(len(labels), self.surrogate_samples, self.seed)
            x, y = dataset_images(dataset, idx), labels[idx]
            with preserved_rng(self._work_device(net)):
                torch.manual_seed(self.seed)
                ADV.train_classifier(net, x, y, self.surrogate_epochs,
                                     generator=torch.Generator().manual_seed(self.seed))
            self.fit_info["surrogate_train_acc"] = ADV.accuracy(net, x, y)
        return net  # callers run it under utils.evaluating (a given module keeps its own mode)

    # -- fit -----------------------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """Whether the trigger state exists (after ``fit`` or loading a fitted ``state_dict``)."""
        return self._fitted_state()

    def _fitted_state(self) -> bool:
        return self.sample_index is not None

    def fit(self, dataset: Any, target: int, model: nn.Module | None = None, *,
            indices: Sequence[int] | Tensor | None = None) -> "FittedAttack":
        """Prepare the trigger from ``dataset`` (images in [0, 1], labels) for target class ``target``.

        Args:
            dataset: the training set (``dataset[i] = (image, label, ...)``).
            target: the target class.
            model: a surrogate that overrides the configured ``surrogate``.
            indices: positions in ``dataset`` poisoned at training time (the data module passes its
                poisoned index set); ``None``: every target-class sample for clean-label attacks,
                none for dirty-label ones (their ``poison_train`` then computes the trigger on the
                fly). Per-sample attacks store these samples' poisoned images.

        Raises:
            ValueError: the target class has no samples, an index is outside the dataset, or the
                surrogate does not fit the data.
        """
        labels = dataset_targets(dataset)
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError(f"target must be an int class index, got {target!r}")
        if not self.dirty_label and not bool((labels == target).any()):
            raise ValueError(f"{self.name} is a clean-label attack but the dataset has no samples of the target class "
                             f"{target} (labels present: {sorted(set(labels.tolist()))[:20]}); choose a target "
                             "class that occurs in the training set")
        if indices is None:  # standalone use: clean-label attacks poison the target class
            idx = torch.nonzero(labels == target).flatten() if not self.dirty_label else torch.empty(0, dtype=torch.long)
        else:
            idx = torch.sort(torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()).values
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(labels)):
                raise ValueError(f"indices must be positions in the dataset of {len(labels)} samples, got "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
        if self._fitted_state() and self._same_fit(idx, target):
            return self
        num_classes = max(int(labels.max()) + 1, target + 1)
        self.fit_info = {"target": int(target)}
        self._fit(dataset, labels, int(target), idx, model, num_classes)
        if self.per_sample:
            self._store_samples(dataset, idx)
        else:
            self.sample_index = idx.clone()
        return self

    def _same_fit(self, idx: Tensor, target: int) -> bool:
        return self.sample_index is not None and torch.equal(self.sample_index.cpu(), idx)

    def _fit(self, dataset: Dataset, labels: Tensor, target: int, indices: Tensor, model: Optional[nn.Module],
             num_classes: int) -> None:
        raise NotImplementedError

    # -- per-sample storage --------------------------------------------------------------------------
    def _train_images(self, x: Tensor, indices: Tensor) -> Tensor:
        """Training-time poisoned images of the batch ``x`` (positions ``indices``), on ``x``'s device."""
        raise NotImplementedError

    def _store_samples(self, dataset: Dataset, idx: Tensor) -> None:
        images = []
        for start in range(0, len(idx), self.batch_size):
            part = idx[start:start + self.batch_size]
            xb = dataset_images(dataset, part)
            images.append(to_uint8(self._train_images(xb, part).cpu()))
        self.sample_index = idx.clone()
        self.sample_images = torch.cat(images) if images else None
        self._check_stored()

    def _check_stored(self) -> None:
        if self.sample_images is not None and len(self.sample_images) != len(self.sample_index):
            raise ValueError(f"sample_images holds {len(self.sample_images)} images for {len(self.sample_index)} "
                             "indices; the state_dict is corrupted")

    def poison_train(self, x: Tensor, index: int) -> Tensor:
        """The training-time poisoned image of sample ``index``: the stored one for per-sample attacks."""
        if self.per_sample and self.sample_images is not None:
            pos = int(torch.searchsorted(self.sample_index, torch.tensor(int(index))))
            if pos < len(self.sample_index) and int(self.sample_index[pos]) == int(index):
                return self.sample_images[pos].to(device=x.device, dtype=x.dtype) / 255.0
        return self.train_trigger(x)  # no stored image: the training-time trigger (attacks/base.py)

    def _surrogate_hparam(self) -> Any:
        s = self.surrogate
        return {"class": type(s).__name__} if isinstance(s, nn.Module) else s

    def _common_hparams(self) -> Dict[str, Any]:
        return {"surrogate": self._surrogate_hparam(), "surrogate_weights": self.surrogate_weights,
                "surrogate_epochs": self.surrogate_epochs, "surrogate_samples": self.surrogate_samples,
                "surrogate_width": self.surrogate_width, "batch_size": self.batch_size, "seed": self.seed}

    def _require_fitted(self, what: str) -> None:
        if not self._fitted_state():
            raise RuntimeError(f"{type(self).__name__} has no {what} yet: call fit(dataset, target) first (a "
                               "BackdoorDataModule does it in setup) or load a fitted state_dict")


def to_uint8(x: Tensor) -> Tensor:
    """``[0, 1]`` floats to ``uint8`` (round to nearest)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _seeded_subset(n: int, k: Optional[int], seed: int) -> Tensor:
    if k is None or k >= n:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k]).values
