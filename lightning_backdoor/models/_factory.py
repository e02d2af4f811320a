"""The model registry and factory, in the manner of timm's ``create_model`` / ``list_models``."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from torch import Tensor, nn

from ..registry import Registry

MODELS = Registry("model")

_COMMON = ("num_classes", "in_channels", "mean", "std")


def _check_kwargs(name: str, ctor: Any, kwargs: dict) -> None:
    try:
        params = inspect.signature(ctor).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = [p for p in params if p not in _COMMON and params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
        raise TypeError(
            f"model {name!r} got unexpected keyword argument(s) {unknown}; "
            f"it accepts {accepted} besides {list(_COMMON)}"
        )


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | float | Tensor | None = None,
    std: Sequence[float] | float | Tensor | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model whose ``forward`` takes pixels in ``[0, 1]``.

    Args:
        name: registered name (see :func:`list_models`); unknown names list the known ones.
        num_classes: number of output logits (int >= 2).
        in_channels: input channels (int >= 1).
        mean: per-channel mean for the model's built-in ``Normalize`` (None: no normalisation).
        std: per-channel std, given together with ``mean``.
        **kwargs: architecture options, e.g. ``width`` (ResNets, SmallCNN), ``width_div`` (VGG),
            ``input_size`` (BadNets CNN).

    Example:
        >>> net = create_model("resnet18", num_classes=10, **DATASET_STATS["cifar10"])  # doctest: +SKIP
    """
    ctor = MODELS.get(name)
    _check_kwargs(name, ctor, kwargs)
    return ctor(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch ``pattern``, e.g. ``list_models("resnet*")``."""
    return MODELS.list(pattern)
