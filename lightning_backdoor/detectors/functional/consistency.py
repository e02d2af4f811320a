"""Prediction consistency under input transformations, as pure torch functions (no Lightning).

Several label-only detectors (ShrinkPad, DeepSweep, TeCo; docs/methods.md §4) classify transformed
copies of each input and compare their labels with the label of the input itself. This module holds
the shared part: build the copies block by block, classify the input and its copies together in as
few forwards as ``batch_size`` allows, and return the labels.

    pred, labels = variant_labels(model, x, make_variants, num_variants=8)   # [N], [8, N]
    change = (labels != pred).float().mean(dim=0)                            # share of changed labels
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn

from ...utils import evaluating
from ...validation import check_positive_int

#: ``make_variants(x_block, start) -> Tensor[V * len(x_block), C, H, W]``, variant-major: rows
#: ``v * len(x_block) + i`` hold variant ``v`` of input ``start + i``. Must not modify ``x_block``.
VariantFn = Callable[[Tensor, int], Tensor]


def predicted_labels(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """``argmax`` of the model's logits for ``images``, in forwards of at most ``batch_size`` images."""
    preds = []
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape [N, num_classes], got {got}")
        preds.append(logits.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=images.device)


def variant_labels(
    model: nn.Module, x: Tensor, make_variants: VariantFn, num_variants: int, *, batch_size: int = 4096
) -> Tuple[Tensor, Tensor]:
    """Labels of ``x`` and of ``num_variants`` transformed copies of every input.

    Inputs are processed in blocks of ``batch_size // (1 + num_variants)`` (at least one): each block
    and its copies are stacked and classified together, so the cost is ``1 + num_variants`` plain
    forward passes per input plus the transformations. The model runs in eval mode without gradients
    (its modes are restored); ``x`` is never modified.

    Returns:
        ``(pred[N], labels[num_variants, N])``: the label of each input and of each of its copies.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> flip = lambda xb, start: xb.flip(-1)
        >>> pred, labels = variant_labels(net, torch.rand(4, 3, 2, 2), flip, 1)
        >>> pred.shape, labels.shape
        (torch.Size([4]), torch.Size([1, 4]))
    """
    check_positive_int(num_variants, "num_variants")
    check_positive_int(batch_size, "batch_size")
    n = len(x)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.view(num_variants, 0)
    chunk = max(1, batch_size // (1 + num_variants))
    preds, labels = [], []
    with evaluating(model):
        for start in range(0, n, chunk):
            xc = x[start:start + chunk]
            variants = make_variants(xc, start)
            expected = (num_variants * len(xc),) + tuple(xc.shape[1:])
            if tuple(variants.shape) != expected:
                raise ValueError(f"make_variants returned shape {tuple(variants.shape)}, expected {expected}")
            out = predicted_labels(model, torch.cat([xc, variants]), batch_size).view(1 + num_variants, len(xc))
            preds.append(out[0])
            labels.append(out[1:])
    return torch.cat(preds), torch.cat(labels, dim=1)


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
