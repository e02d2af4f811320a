"""Feature spaces for sanitisers: raw pixels, or the penultimate features of a model (torch only).

A feature extractor maps a batch of images in pixel space ``[0, 1]`` (``[N, C, H, W]``) to one
feature vector per image (``[N, D]``). :func:`extract_features` runs one over a dataset or loader
in batches, on the extractor's device, and returns the features with the labels, poisoned flags
and dataset indices the samples carry.

- :class:`PixelFeatures`: the flattened images (the paper's setting for MNIST).
- :class:`ModelFeatures`: what a network computes before its classification head (the input of
  its last ``nn.Linear``, caught by a forward pre-hook), or the output of a named layer. Use a
  clean model (trained on trusted data), or the suspect model itself (e.g. a checkpoint of a run
  on the poisoned data). The model is never modified: it runs in eval mode under ``no_grad`` and
  comes back in its own mode; when another ``device`` is asked for, a copy is moved there.

Example:
    >>> import torch
    >>> from torch import nn
    >>> PixelFeatures()(torch.rand(4, 1, 28, 28)).shape
    torch.Size([4, 784])
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> ModelFeatures(net)(torch.rand(4, 1, 28, 28)).shape   # the 32 inputs of the head
    torch.Size([4, 32])
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..batch import parse_batch
from ..utils import evaluating, model_device, preserved_rng
from ..validation import check_images, check_positive_int

__all__ = ["ExtractedFeatures", "FeatureExtractor", "ModelFeatures", "PixelFeatures", "extract_features",
           "flatten_features"]


def flatten_features(out: Any, n: int, name: str = "feature extractor") -> Tensor:
    """``out`` flattened to ``[n, D]``; a clear error when it is not one feature vector per image."""
    if not isinstance(out, Tensor):
        raise TypeError(f"the {name} must return a Tensor of features [N, ...], got {type(out).__name__}")
    if out.dim() < 2 or out.shape[0] != n:
        raise ValueError(f"the {name} must return one feature vector per image, i.e. a tensor of shape [N, ...] "
                         f"with N={n} that is 2-D after flattening, got shape {tuple(out.shape)}")
    if not torch.is_floating_point(out):
        out = out.float()
    return out.flatten(1)


class FeatureExtractor:
    """Base class: ``extractor(x)`` maps ``[N, C, H, W]`` images in ``[0, 1]`` to ``[N, D]`` features.

    Subclasses set ``name`` and implement :meth:`forward`; ``device`` is where the work runs.
    """

    name: str = "features"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        x = check_images(x, "images", allow_single=False)
        return flatten_features(self.forward(x.to(self.device)), len(x), f"{self.name} feature extractor")

    def hparams(self) -> Dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class PixelFeatures(FeatureExtractor):
    """The raw pixels, flattened (``C·H·W`` features per image).

    Args:
        device: where to compute (default CPU; pixel features are a reshape).
    """

    name = "pixels"

    def __init__(self, device: Optional[str] = None) -> None:
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class ModelFeatures(FeatureExtractor):
    """The features a network computes for its head (penultimate layer), or the output of a named layer.

    Args:
        net: the network (images in ``[0, 1]``, normalisation inside, as every model of
            :mod:`lightning_backdoor.models`).
        layer: ``None`` (default): the input of the network's last ``nn.Linear`` (its head), caught
            with a forward pre-hook; or the qualified name of a submodule (``"layer3"``,
            ``"avgpool"``) whose output, flattened, is the feature vector.
        weights: optional checkpoint whose network weights are loaded into ``net`` first (a Lightning
            ``.ckpt`` of a ``BackdoorClassifier`` or a file of ``net.state_dict()``, read with
            ``weights_only=True``), e.g. a clean model or the suspect run's ``last.ckpt``.
        device: where to run (``None``: the network's own device; ``"auto"``: CUDA when available).
            A network on another device is copied there; the caller's network is never moved.

    Example:
        >>> from lightning_backdoor.models import create_model
        >>> feats = ModelFeatures(create_model("resnet20", num_classes=10, in_channels=1))
        >>> feats(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    name = "model"

    def __init__(self, net: nn.Module, layer: Optional[str] = None, weights: Optional[str] = None,
                 device: Optional[str] = None) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be None (the input of the head) or a submodule name, got {layer!r}")
        modules = dict(net.named_modules())
        if layer is not None and layer not in modules:
            known = [k for k in modules if k][:30]
            raise ValueError(f"layer {layer!r} is not a submodule of {type(net).__name__}; known: {', '.join(known)}")
        if layer is None and not any(isinstance(m, nn.Linear) for m in net.modules()):
            raise ValueError(f"{type(net).__name__} has no nn.Linear head whose input could serve as the penultimate "
                             "features; name a layer with layer=<submodule name>")
        if weights is not None:
            from ..checkpoints import load_net_weights

            load_net_weights(net, os.fspath(weights))
        self.net, self.layer, self.weights = net, layer, None if weights is None else os.fspath(weights)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device) if device is not None else None
        self._moved: Optional[nn.Module] = None

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else model_device(self.net)

    def _module(self) -> nn.Module:
        if self._device is None or model_device(self.net) == self._device:
            return self.net
        if self._moved is None:  # a copy on the asked device; the caller's network stays where it is
            self._moved = copy.deepcopy(self.net).to(self._device)
        return self._moved

    def _hooked(self, net: nn.Module) -> nn.Module:
        if self.layer is not None:
            return dict(net.named_modules())[self.layer]
        return [m for m in net.modules() if isinstance(m, nn.Linear)][-1]

    def forward(self, x: Tensor) -> Tensor:
        net = self._module()
        caught: Dict[str, Any] = {}
        target = self._hooked(net)
        if self.layer is None:
            handle = target.register_forward_pre_hook(lambda m, args: caught.setdefault("out", args[0]))
        else:
            handle = target.register_forward_hook(lambda m, args, out: caught.setdefault("out", out))
        try:
            with evaluating(net):
                net(x)
        finally:
            handle.remove()
        if "out" not in caught:
            where = f"layer {self.layer!r}" if self.layer else "the head (last nn.Linear)"
            raise RuntimeError(f"{where} of {type(self.net).__name__} was not called in its forward pass")
        return caught["out"]

    def hparams(self) -> Dict[str, Any]:
        return {"net": type(self.net).__name__, "layer": self.layer, "weights": self.weights}


class ExtractedFeatures(NamedTuple):
    """Features of a dataset: ``features [N, D]``, ``labels [N]`` (the training labels ``y``),
    ``poisoned [N]`` (bool; all False when the samples do not say) and ``index [N]`` (dataset indices)."""

    features: Tensor
    labels: Tensor
    poisoned: Tensor
    index: Tensor


def extract_features(data: Dataset | DataLoader, extractor: Optional[FeatureExtractor] = None, *,
                     batch_size: int = 256) -> ExtractedFeatures:
    """Run ``extractor`` (default :class:`PixelFeatures`) over ``data`` in batches, without gradients.

    Args:
        data: a dataset of ``(x, y, ...)`` / :class:`~lightning_backdoor.data.Sample` items, or a
            loader of such batches (read with :func:`~lightning_backdoor.batch.parse_batch`).
        extractor: the feature space.
        batch_size: batch size when ``data`` is a dataset.

    The global random state is preserved (datasets that draw random numbers while loading, e.g.
    WaNet's cover samples, do not shift the caller's stream). Outputs are on the CPU.
    """
    extractor = PixelFeatures() if extractor is None else extractor
    if not callable(extractor):
        raise TypeError(f"extractor must be a FeatureExtractor (callable on images), got {type(extractor).__name__}")
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=check_positive_int(batch_size, "batch_size"), shuffle=False)
    else:
        raise TypeError(f"data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    feats, labels, poisoned, index = [], [], [], []
    seen = 0
    with preserved_rng(), torch.no_grad():
        for batch in loader:
            b = parse_batch(batch, require_labels=True)
            f = extractor(b.x)
            n = len(b.x)
            feats.append(flatten_features(f, n).detach().cpu())
            labels.append(b.y.cpu().long())
            poisoned.append(b.poisoned.cpu() if b.poisoned is not None else torch.zeros(n, dtype=torch.bool))
            index.append(b.index.cpu().long() if b.index is not None else torch.arange(seen, seen + n))
            seen += n
    if not feats:
        raise ValueError("data is empty: no samples to compute features of")
    return ExtractedFeatures(torch.cat(feats), torch.cat(labels), torch.cat(poisoned), torch.cat(index))
