"""ShrinkPad as a detector, in pure torch (no Lightning).

ShrinkPad (Li et al., "Backdoor Attack in the Physical World", ICLR 2021 workshop; used as a baseline
by SCALE-UP and IBD-PSC) shrinks an image by a few pixels and pads it back to its size at a random
offset, which moves or damages a trigger tied to a place in the image. A single prediction change
flags nothing by itself; as a detector the score is the share of ``n`` random paddings whose
prediction differs from the prediction on the unchanged input (docs/methods.md §4). Label-only.

    offsets = torch.randint(0, shrink + 1, (N, n, 2))         # (top, left) per input and padding
    copies = shrink_pad(x, shrink, offsets[:, v])             # one padding of every input
    score = shrink_pad_score(model, x, shrink, offsets)       # Tensor[N] in [0, 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...validation import check_positive_int
from .consistency import label_change_rate, variant_labels


def check_shrink(shrink: int, height: int, width: int) -> int:
    """``shrink`` must leave at least one pixel: ``1 <= shrink < min(height, width)``."""
    check_positive_int(shrink, "shrink")
    if shrink >= min(height, width):
        raise ValueError(f"shrink={shrink} is not smaller than the image size {height}x{width}; "
                         f"ShrinkPad needs 1 <= shrink < {min(height, width)}")
    return shrink


def shrink_pad(x: Tensor, shrink: int, offsets: Tensor) -> Tensor:
    """Resize each image to ``(H - shrink, W - shrink)`` (bilinear, antialiased) and zero-pad it back to
    ``H x W`` with ``offsets[i] = (top, left)`` pixels above / left of it (each in ``[0, shrink]``).

    Returns a new tensor; ``x`` is untouched.

    Example:
        >>> out = shrink_pad(torch.ones(2, 1, 6, 6), 2, torch.tensor([[0, 0], [2, 1]]))
        >>> out.shape, float(out[1, 0, 0, 0]), float(out[1, 0, 2, 1])
        (torch.Size([2, 1, 6, 6]), 0.0, 1.0)
    """
    n, c, h, w = x.shape
    check_shrink(shrink, h, w)
    offsets = offsets.to(x.device).long()
    if offsets.shape != (n, 2) or bool(((offsets < 0) | (offsets > shrink)).any()):
        raise ValueError(f"offsets must be an integer Tensor[{n}, 2] of (top, left) values in [0, {shrink}]")
    small = F.interpolate(x, size=(h - shrink, w - shrink), mode="bilinear", align_corners=False, antialias=True)
    out = x.new_zeros(x.shape)
    codes = offsets[:, 0] * (shrink + 1) + offsets[:, 1]
    for code in torch.unique(codes).tolist():
        top, left = divmod(int(code), shrink + 1)
        rows = (codes == code).nonzero().flatten()
        out[rows, :, top:top + h - shrink, left:left + w - shrink] = small[rows]
    return out.clamp_(0.0, 1.0)


def shrink_pad_score(model: nn.Module, x: Tensor, shrink: int, offsets: Tensor, *, batch_size: int | None = None,
                     return_pred: bool = False):
    """Share of the paddings ``offsets[:, v]`` (``[N, n, 2]``) whose label differs from ``C(x)``.

    Cost: ``1 + n`` forward passes per input. Returns ``Tensor[N]`` in ``[0, 1]`` (higher = more likely
    poisoned), and the labels ``C(x)`` when ``return_pred``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        >>> offs = torch.randint(0, 3, (5, 4, 2), generator=torch.Generator().manual_seed(0))
        >>> shrink_pad_score(net, torch.rand(5, 3, 4, 4), 2, offs).shape
        torch.Size([5])
    """
    n_in = len(x)
    check_shrink(shrink, x.shape[-2], x.shape[-1])
    if offsets.dim() != 3 or offsets.shape[0] != n_in or offsets.shape[2] != 2:
        raise ValueError(f"offsets must have shape [{n_in}, n, 2], got {tuple(offsets.shape)}")
    num = offsets.shape[1]

    def make(xc: Tensor, v: int) -> Tensor:
        return shrink_pad(xc, shrink, offsets[:, v])

    pred, labels = variant_labels(model, x, make, num, batch_size=batch_size)
    score = label_change_rate(pred, labels)
    return (score, pred) if return_pred else score
