"""One reader for every batch format the project accepts (torch only).

Our loaders yield :class:`~lightning_backdoor.data.Sample` batches ``(x, y, poisoned, original_y,
index)``. A user's loaders may yield plain ``(x, y)`` tuples, a bare image tensor, or dicts. Every
consumer — :class:`~lightning_backdoor.modules.BackdoorClassifier`, the ``DetectionCallback`` and
``BackdoorMetrics`` callbacks, and the detectors' ``fit`` — reads batches with :func:`parse_batch`,
so they all accept the same forms:

=====================================  ==========================================================
batch                                  read as
=====================================  ==========================================================
``x`` (a Tensor)                       images only (no labels)
``(x,)``, ``(x, y)``                   images, labels; ``original_y = y``, ``poisoned`` unknown
``(x, y, poisoned, original_y[, index])``  the :class:`Sample` layout
dict                                   keys ``x``/``image``/``input``, ``y``/``label``/``target``,
                                       ``poisoned``, ``original_y``, ``index``
=====================================  ==========================================================

``original_y`` is the *true* label: in a poisoned evaluation loader of ``(x, y)`` pairs, ``y`` must
therefore be the true label (what ``ASR`` excludes the target class by); our poisoned sets carry
the target in ``y`` and the true label in ``original_y``.

Example:
    >>> import torch
    >>> b = parse_batch((torch.zeros(2, 1, 4, 4), torch.tensor([3, 1])))
    >>> b.y.tolist(), b.original_y.tolist(), b.poisoned
    ([3, 1], [3, 1], None)
    >>> parse_batch({"image": torch.zeros(1, 1, 4, 4), "label": torch.tensor([2])}).y.tolist()
    [2]
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Batch", "parse_batch"]

_X_KEYS = ("x", "image", "images", "input", "inputs")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


class Batch(NamedTuple):
    """A parsed batch; fields the batch does not carry are None."""

    x: Tensor
    y: Optional[Tensor]
    poisoned: Optional[Tensor]
    original_y: Optional[Tensor]
    index: Optional[Tensor]


def _tensor_or_none(value: Any, name: str, n: int, *, dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    if value is None:
        return None
    if not isinstance(value, Tensor):
        if isinstance(value, (list, tuple)) or isinstance(value, (int, bool)):
            value = torch.as_tensor(value)
        else:
            raise TypeError(f"batch field {name!r} must be a Tensor, got {type(value).__name__}")
    value = value.reshape(-1) if value.dim() == 0 else value
    if value.dim() != 1 or len(value) != n:
        raise ValueError(f"batch field {name!r} must have one entry per image ({n}), got shape {tuple(value.shape)}")
    return value.to(dtype) if dtype is not None else value


def parse_batch(batch: Any, *, require_labels: bool = False) -> Batch:
    """Read ``batch`` into a :class:`Batch` (see the module docstring for the accepted forms).

    Args:
        batch: a Tensor, a tuple/list ``(x, y, poisoned, original_y, index)`` (any prefix), or a dict.
        require_labels: raise if the batch carries no labels.

    Raises:
        TypeError / ValueError: a batch of another type, a dict without an image key, fields whose
            length differs from the number of images, or no labels when ``require_labels``.
    """
    if isinstance(batch, Tensor):
        x, y, poisoned, original_y, index = batch, None, None, None, None
    elif isinstance(batch, dict):
        xk = next((k for k in _X_KEYS if k in batch), None)
        if xk is None:
            raise ValueError(f"cannot find images in a dict batch with keys {sorted(map(str, batch))}; "
                             f"expected one of {list(_X_KEYS)} (and labels under one of {list(_Y_KEYS)})")
        yk = next((k for k in _Y_KEYS if k in batch), None)
        x, y = batch[xk], batch.get(yk) if yk is not None else None
        poisoned, original_y, index = batch.get("poisoned"), batch.get("original_y"), batch.get("index")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1:
        fields = list(batch[:5]) + [None] * (5 - min(len(batch), 5))
        x, y, poisoned, original_y, index = fields
    else:
        raise TypeError(
            f"cannot read a batch of type {type(batch).__name__}; expected a Tensor of images, a tuple "
            "(x, y[, poisoned, original_y, index]) or a dict with 'x' and 'y'"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"the first batch element must be a Tensor of images, got {type(x).__name__}")
    n = len(x) if x.dim() > 0 else 0
    y = _tensor_or_none(y, "y", n)
    if require_labels and y is None:
        raise ValueError("this batch carries no labels; expected (x, y, ...) tuples or dicts with 'y'")
    poisoned = _tensor_or_none(poisoned, "poisoned", n, dtype=torch.bool)
    original_y = _tensor_or_none(original_y, "original_y", n)
    if original_y is None:
        original_y = y
    index = _tensor_or_none(index, "index", n)
    return Batch(x, y, poisoned, original_y, index)
