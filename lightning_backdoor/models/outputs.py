"""Reading logits out of a model's output, with one clear error for every component.

Detectors, :class:`~lightning_backdoor.modules.BackdoorClassifier` and the callbacks need a model whose
forward returns logits ``[N, K]`` (``K >= 2``) for images in ``[0, 1]``. Models that return something
else (a tuple ``(logits, features)``, a dict ``{"logits": ...}``, an output object with a ``.logits``
attribute) are rejected at the first batch by :func:`check_logits` with a message saying how to
adapt them: pass ``output_key=`` to the classifier or callback, or wrap the model in
:class:`LogitsOf` before handing it to a detector.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class TwoHeads(nn.Module):
    ...     def forward(self, x):
    ...         return {"logits": x.flatten(1)[:, :3], "features": x.flatten(1)}
    >>> net = LogitsOf(TwoHeads(), "logits")
    >>> net(torch.rand(2, 1, 2, 2)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["LogitsOf", "check_logits", "select_output"]

OutputKey = Union[str, int, None]


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a Tensor of shape {tuple(output.shape)} and dtype {output.dtype}"
    if isinstance(output, dict):
        return f"a dict with keys {sorted(map(str, output))}"
    if isinstance(output, (tuple, list)):
        inner = ", ".join(type(o).__name__ + (f"{list(o.shape)}" if isinstance(o, Tensor) else "") for o in output)
        return f"a {type(output).__name__} of {len(output)} ({inner})"
    return f"a {type(output).__name__}"


def _hint(output: Any) -> str:
    if isinstance(output, dict):
        keys = [k for k in output if isinstance(output[k], Tensor)]
        key = "logits" if "logits" in output else (keys[0] if keys else "<key>")
        return f"output_key={key!r}"
    if isinstance(output, (tuple, list)):
        return "output_key=0"
    if hasattr(output, "logits"):
        return "output_key='logits'"
    return "output_key=<key>"


def check_logits(output: Any, where: str = "the model", *, num_classes: Optional[int] = None) -> Tensor:
    """``output`` must be floating-point logits ``[N, K]`` with ``K >= 2``; returns it.

    Raises:
        TypeError: the model returned a tuple, dict or other object (the message names the
            ``output_key=`` that would select the logits), or integer values.
        ValueError: a tensor of another rank, one output class only, or ``K != num_classes``.
    """
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{where} must return logits [N, num_classes], but returned {_describe(output)}. Select the logits "
            f"with {_hint(output)} (BackdoorClassifier, DetectionCallback and BackdoorMetrics accept it), or wrap "
            f"the model: lightning_backdoor.models.LogitsOf(model, {_hint(output).split('=')[1]}) before passing it "
            "to a detector"
        )
    if output.dim() != 2:
        raise ValueError(f"{where} must return logits of shape [N, num_classes], got shape {tuple(output.shape)}")
    if not torch.is_floating_point(output):
        raise TypeError(f"{where} must return floating-point logits, got dtype {output.dtype}")
    if output.shape[1] < 2:
        raise ValueError(
            f"{where} returns {output.shape[1]} output (shape {tuple(output.shape)}); backdoor detection and BA/ASR "
            "need a classifier with at least 2 classes (one logit per class, not a single sigmoid score)"
        )
    if num_classes is not None and output.shape[1] != num_classes:
        raise ValueError(f"{where} returns {output.shape[1]} logits but the data has num_classes={num_classes}")
    return output


def select_output(output: Any, output_key: OutputKey) -> Any:
    """``output[output_key]`` for dicts/tuples, ``getattr(output, output_key)`` for objects; ``output`` if key is None."""
    if output_key is None:
        return output
    if isinstance(output, dict):
        if output_key not in output:
            raise KeyError(f"output_key={output_key!r} is not a key of the model's output; keys: {sorted(map(str, output))}")
        return output[output_key]
    if isinstance(output, (tuple, list)):
        if not isinstance(output_key, int) or not -len(output) <= output_key < len(output):
            raise KeyError(f"output_key={output_key!r} does not index the model's {type(output).__name__} of "
                           f"{len(output)} outputs; use an int in [0, {len(output) - 1}]")
        return output[output_key]
    if isinstance(output_key, str) and hasattr(output, output_key):
        return getattr(output, output_key)
    raise KeyError(f"output_key={output_key!r} cannot select from the model's output ({_describe(output)})")


torch.fx.wrap("select_output")


def check_output_key(value: Any) -> OutputKey:
    """``output_key`` must be None, a str or an int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise TypeError(f"output_key must be None, a str (dict key / attribute) or an int (tuple index), got {value!r}")
    return value


class LogitsOf(nn.Module):
    """Adapter: ``LogitsOf(model, output_key)(x) == select(model(x), output_key)``.

    Wrap a model whose forward returns a tuple, a dict or an output object, so detectors see plain
    logits. Parameter names gain the ``model.`` prefix; ``num_classes`` / ``in_channels`` are passed
    through when the model has them.

    Args:
        model: the network.
        output_key: dict key or attribute name (``"logits"``), or tuple index (``0``).
    """

    def __init__(self, model: nn.Module, output_key: Union[str, int]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if check_output_key(output_key) is None:
            raise ValueError("LogitsOf needs an output_key (a dict key, attribute name or tuple index)")
        self.model = model
        self.output_key = output_key
        for attr in ("num_classes", "in_channels"):
            if isinstance(getattr(model, attr, None), int):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: Tensor) -> Tensor:
        return select_output(self.model(x), self.output_key)
