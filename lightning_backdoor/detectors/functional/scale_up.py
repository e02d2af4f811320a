"""SCALE-UP scores as pure torch functions (no Lightning).

Guo et al., "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing
Scaled Prediction Consistency", ICLR 2023. Threat model: black-box, label-only -- only the
predicted labels of the model are used.

    spc = scale_up_spc(model, x, scales=(3, 5, 7, 9, 11))              # Tensor[N] in [0, 1]
    spc, pred = scale_up_spc(model, x, scales, return_pred=True)
    mean, std, counts = scale_up_class_stats(spc, pred, num_classes=10)  # from benign data
    nspc = scale_up_nspc(spc, pred, mean, std)                          # per-class z-score
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...models.outputs import check_logits
from ...utils import evaluating

DEFAULT_SCALES: Tuple[float, ...] = (3.0, 5.0, 7.0, 9.0, 11.0)


def check_scales(scales: object, name: str = "scales") -> Tuple[float, ...]:
    """Return ``scales`` as a tuple of finite floats ``> 1`` (amplification factors), raising on anything else."""
    if isinstance(scales, Tensor):
        scales = scales.flatten().tolist()
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"{name} must be a non-empty sequence of positive numbers, e.g. (3, 5, 7, 9, 11), got {scales!r}")
    values = list(scales)  # type: ignore[call-overload]
    if not values:
        raise ValueError(f"{name} must be a non-empty sequence of positive numbers, e.g. (3, 5, 7, 9, 11), got {scales!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must contain real numbers, got {v!r} in {scales!r}")
        if not math.isfinite(float(v)) or v <= 1:
            raise ValueError(f"{name} must contain finite numbers > 1, got {v!r} in {scales!r} (SCALE-UP multiplies "
                             "pixel values by n > 1; n = 1 is the identity and n < 1 darkens the image instead)")
        out.append(float(v))
    return tuple(out)


def _argmax_logits(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Predicted labels of ``images`` in forwards of at most ``batch_size`` images."""
    preds = []
    for start in range(0, len(images), batch_size):
        logits = check_logits(model(images[start : start + batch_size]))
        preds.append(logits.argmax(dim=1))
    return torch.cat(preds)


def scale_up_spc(
    model: nn.Module,
    x: Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    *,
    batch_size: Optional[int] = None,
    return_pred: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scaled prediction consistency: the share of scales ``n`` with ``C(clip(n*x, 0, 1)) == C(x)``.

    The cost is ``1 + len(scales)`` plain forward passes of ``x``:

    - ``batch_size=None`` (default): one forward of the whole batch ``x``, then one per scale on its
      scaled copy -- every forward is exactly as large as the caller's batch, so the cost is the ideal
      ``1 + |S|`` plain forwards at that batch size, on any device, with the memory of one copy;
    - ``batch_size=k``: the inputs and their scaled copies are stacked and classified together in
      forwards of at most ``k`` images (as few forwards as ``k`` allows). On a GPU a large ``k``
      merges small batches into fewer, fuller forwards; on a CPU one large forward is *slower* per
      image than several of the caller's size (measured in ``benchmarks/bench_detectors.py``).

    The model is run in eval mode without gradients (its modes are restored); ``x`` is never modified.

    Args:
        model: classifier returning logits ``[N, K]``; it takes pixel-space input (any
            normalisation is inside the model).
        x: images ``[N, C, H, W]`` in ``[0, 1]`` on the model's device.
        scales: the scaling factors ``S`` (paper default ``(3, 5, 7, 9, 11)``).
        batch_size: None, or the maximum number of images per forward pass of the stacked copies.
        return_pred: also return ``C(x)``, the predicted labels of the unscaled images.

    Returns:
        float ``Tensor[N]`` of SPC values in ``[0, 1]`` (higher = more likely poisoned), and the
        long ``Tensor[N]`` of predictions when ``return_pred``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> scale_up_spc(net, torch.rand(4, 3, 2, 2)).shape
        torch.Size([4])
    """
    scales = check_scales(scales)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    n = len(x)
    copies = 1 + len(scales)
    if n == 0:
        empty = torch.zeros(0, device=x.device)
        return (empty, torch.zeros(0, dtype=torch.long, device=x.device)) if return_pred else empty
    with evaluating(model):
        if batch_size is None:
            pred_t = _argmax_logits(model, x, n)
            same = torch.zeros(n, device=x.device)
            buf = torch.empty_like(x)
            for s in scales:
                torch.mul(x, s, out=buf)
                same += (_argmax_logits(model, buf.clamp_(0.0, 1.0), n) == pred_t).float()
            spc_t = same / len(scales)
            return (spc_t, pred_t) if return_pred else spc_t
        chunk = max(1, batch_size // copies)  # inputs per stacked block of (1 + |S|) * chunk images
        spc, pred = [], []
        for start in range(0, n, chunk):
            xc = x[start : start + chunk]
            # the block and its scaled copies written once into one buffer and classified together
            stacked = torch.empty((copies * len(xc),) + tuple(xc.shape[1:]), dtype=xc.dtype, device=xc.device)
            stacked[: len(xc)] = xc
            for j, s in enumerate(scales, start=1):
                torch.mul(xc, s, out=stacked[j * len(xc) : (j + 1) * len(xc)])
            stacked[len(xc):].clamp_(0.0, 1.0)
            labels = _argmax_logits(model, stacked, batch_size).view(copies, len(xc))
            spc.append((labels[1:] == labels[0]).float().mean(dim=0))
            pred.append(labels[0])
    spc_t = torch.cat(spc)
    return (spc_t, torch.cat(pred)) if return_pred else spc_t


def scale_up_class_stats(spc: Tensor, pred: Tensor, num_classes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-predicted-class mean and (population, ``correction=0``) std of benign SPC values.

    Returns ``(mean[K], std[K], counts[K])``; classes without samples get mean and std NaN.
    """
    if spc.shape != pred.shape or spc.dim() != 1:
        raise ValueError(f"spc and pred must be 1-D tensors of equal length, got {tuple(spc.shape)} and {tuple(pred.shape)}")
    spc = spc.float()
    pred = pred.long()
    counts = torch.bincount(pred, minlength=num_classes)[:num_classes].to(spc.dtype)
    sums = torch.zeros(num_classes, dtype=spc.dtype, device=spc.device).index_add_(0, pred, spc)
    mean = sums / counts  # NaN where count == 0
    sq = torch.zeros_like(sums).index_add_(0, pred, (spc - mean[pred]) ** 2)
    std = (sq / counts).sqrt()
    return mean, std, counts.long()


def scale_up_nspc(spc: Tensor, pred: Tensor, mean_per_class: Tensor, std_per_class: Tensor) -> Tensor:
    """Data-limited SCALE-UP: the per-predicted-class z-score ``(SPC - mu[pred]) / sigma[pred]``.

    (The paper prints ``SPC - mu/sigma``; the z-score it describes is what is computed.)

    Args:
        spc: ``Tensor[N]`` of SPC values from :func:`scale_up_spc`.
        pred: ``Tensor[N]`` predicted labels of the unscaled inputs.
        mean_per_class: ``Tensor[K]`` benign SPC means per predicted class.
        std_per_class: ``Tensor[K]`` benign SPC stds per predicted class; every entry used must
            be finite and > 0 (resolve missing or zero-std classes before calling).
    """
    if spc.shape != pred.shape or spc.dim() != 1:
        raise ValueError(f"spc and pred must be 1-D tensors of equal length, got {tuple(spc.shape)} and {tuple(pred.shape)}")
    if mean_per_class.dim() != 1 or mean_per_class.shape != std_per_class.shape:
        raise ValueError(
            "mean_per_class and std_per_class must be 1-D tensors of equal length, got "
            f"{tuple(mean_per_class.shape)} and {tuple(std_per_class.shape)}"
        )
    k = len(mean_per_class)
    pred = pred.long()
    if len(pred) and (int(pred.min()) < 0 or int(pred.max()) >= k):
        raise ValueError(f"pred must hold class indices in [0, {k - 1}], got values in [{int(pred.min())}, {int(pred.max())}]")
    mu = mean_per_class.to(spc.device, torch.float32)[pred]
    sigma = std_per_class.to(spc.device, torch.float32)[pred]
    if len(sigma) and not bool((torch.isfinite(sigma) & (sigma > 0) & torch.isfinite(mu)).all()):
        raise ValueError("std_per_class must be finite and > 0 (and mean_per_class finite) for every predicted class")
    return (spc.float() - mu) / sigma
