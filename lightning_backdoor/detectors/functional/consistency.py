"""Prediction consistency under input transformations, as pure torch functions (no Lightning).

Several label-only detectors (ShrinkPad, DeepSweep, TeCo; docs/methods.md §4) classify transformed
copies of each input and compare their labels with the label of the input itself. This module holds
the shared part: classify the batch, then each copy of the batch in turn, and return the labels.

    pred, labels = variant_labels(model, x, make_variant, num_variants=8)    # [N], [8, N]
    change = (labels != pred).float().mean(dim=0)                            # share of changed labels
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ...utils import evaluating
from ...validation import check_optional_positive_int, check_positive_int

#: ``make_variant(x, v) -> Tensor[len(x), C, H, W]``: copy ``v`` (``0 <= v < num_variants``) of every
#: input. Must return a new tensor and never modify ``x``.
VariantFn = Callable[[Tensor, int], Tensor]


def predicted_labels(model: nn.Module, images: Tensor, batch_size: Optional[int] = None) -> Tensor:
    """``argmax`` of the model's logits for ``images``, in forwards of at most ``batch_size`` images (None: one)."""
    step = max(1, len(images)) if batch_size is None else batch_size
    preds = []
    for start in range(0, len(images), step):
        logits = model(images[start:start + step])
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape [N, num_classes], got {got}")
        preds.append(logits.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=images.device)


def variant_labels(
    model: nn.Module, x: Tensor, make_variant: VariantFn, num_variants: int, *, batch_size: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    """Labels of ``x`` and of ``num_variants`` transformed copies of every input.

    The batch is classified once, then each copy of the whole batch is made and classified in turn,
    so every forward is as large as the caller's batch (capped at ``batch_size`` images when given)
    and only one copy is in memory at a time: the cost is ``1 + num_variants`` plain forward passes at
    the caller's batch size, plus the transformations. (One forward of many stacked copies is slower
    per image on a CPU than several of the caller's size; see ``benchmarks/bench_detectors.py``.) The
    model runs in eval mode without gradients (its modes are restored); ``x`` is never modified.

    Returns:
        ``(pred[N], labels[num_variants, N])``: the label of each input and of each of its copies.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> flip = lambda xb, v: xb.flip(-1)
        >>> pred, labels = variant_labels(net, torch.rand(4, 3, 2, 2), flip, 1)
        >>> pred.shape, labels.shape
        (torch.Size([4]), torch.Size([1, 4]))
    """
    check_positive_int(num_variants, "num_variants")
    check_optional_positive_int(batch_size, "batch_size")
    n = len(x)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.view(num_variants, 0)
    labels = []
    with evaluating(model):
        pred = predicted_labels(model, x, batch_size)
        for v in range(num_variants):
            copy = make_variant(x, v)
            if tuple(copy.shape) != tuple(x.shape):
                raise ValueError(f"make_variant returned shape {tuple(copy.shape)} for variant {v}, expected "
                                 f"{tuple(x.shape)}")
            labels.append(predicted_labels(model, copy.to(x.dtype), batch_size))
    return pred, torch.stack(labels)


def label_change_rate(pred: Tensor, labels: Tensor) -> Tensor:
    """Share of the copies whose label differs from the input's: ``mean_v 1[labels[v] != pred]`` (``Tensor[N]``)."""
    return (labels != pred.unsqueeze(0)).float().mean(dim=0)


def per_sample_generators(seed: int, sample_ids: Tensor, salt: int = 0) -> list:
    """One CPU ``torch.Generator`` per input, seeded from ``(seed, id, salt)`` only (batch- and rank-independent)."""
    return [torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i) * 7919 + int(salt)) % 2**63)
            for i in sample_ids.tolist()]


def check_sample_ids(sample_ids: object, num: int) -> Tensor:
    """``sample_ids`` as a 1-D integer tensor of length ``num`` (one id per input), else a ``ValueError``."""
    ids = torch.as_tensor(sample_ids)
    if ids.dim() != 1 or len(ids) != num or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be an integer Tensor[{num}] (one id per input), got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    return ids.cpu().long()
