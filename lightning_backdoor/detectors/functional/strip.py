"""STRIP scores as pure torch functions (no Lightning).

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019.
Threat model: black-box with probabilities -- the softmax output of the model is used.

Each input is superimposed with ``n`` random clean images; a trigger that dominates the
prediction keeps the superimposed predictions confident, so their entropy *over classes* is
low. The score is minus the mean entropy (in nats), so higher = more likely poisoned.

    g = torch.Generator().manual_seed(0)
    scores = strip_entropy(model, x, clean_pool, n=100, generator=g)   # Tensor[N], = -entropy
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...models.outputs import check_logits
from ...utils import evaluating
from ...validation import check_positive_int

STRIP_MODES = ("add", "average")


def superimpose(x: Tensor, overlay: Tensor, mode: str = "add") -> Tensor:
    """Blend images into new tensors (inputs untouched).

    ``"add"`` (original STRIP): ``clip(x + overlay, 0, 1)``, which keeps a patch trigger intact.
    ``"average"``: ``(x + overlay) / 2``, which halves the trigger and weakens detection.
    """
    if mode == "add":
        return (x + overlay).clamp_(0.0, 1.0)
    if mode == "average":
        return (x + overlay).mul_(0.5)
    raise ValueError(f"mode must be one of {list(STRIP_MODES)}, got {mode!r}")


def strip_overlay_indices(
    num_inputs: int,
    pool_size: int,
    n: int,
    generator: Optional[torch.Generator] = None,
    exclude: Optional[Tensor] = None,
) -> Tensor:
    """Indices ``[num_inputs, n]`` into the clean pool: for each input, ``n`` distinct pool images
    when there are at least ``n`` to choose from (a random permutation prefix), otherwise ``n`` draws
    with replacement.

    Args:
        num_inputs, pool_size, n: sizes.
        generator: the random source; indices are drawn on its device (CPU for a default one).
        exclude: optional ``[num_inputs]`` pool index per input that it must never be blended with
            (``-1``: none). Used when the inputs are themselves pool images (STRIP's threshold
            calibration), so that no image is superimposed with itself.
    """
    if pool_size < 1:
        raise ValueError(f"the clean pool must hold at least one image, got pool_size={pool_size}")
    device = generator.device if generator is not None else torch.device("cpu")
    if exclude is None:
        if pool_size >= n:
            keys = torch.rand(num_inputs, pool_size, generator=generator, device=device)
            return keys.argsort(dim=1)[:, :n]
        return torch.randint(pool_size, (num_inputs, n), generator=generator, device=device)
    exclude = exclude.to(device=device, dtype=torch.long).view(-1)
    if exclude.shape != (num_inputs,):
        raise ValueError(f"exclude must have shape ({num_inputs},), got {tuple(exclude.shape)}")
    has = exclude >= 0
    if bool(has.any()) and pool_size < 2:
        raise ValueError("cannot exclude an input from a clean pool of one image; the pool needs at least 2 images")
    if pool_size - 1 >= n:
        keys = torch.rand(num_inputs, pool_size, generator=generator, device=device)
        rows = torch.nonzero(has).flatten()
        keys[rows, exclude[rows]] = 2.0  # sorts after every U[0, 1) key: never among the first n
        return keys.argsort(dim=1)[:, :n]
    # fewer than n others: draw with replacement among the pool images other than the excluded one
    draw = torch.randint(max(pool_size - 1, 1), (num_inputs, n), generator=generator, device=device)
    shift = has.view(-1, 1) & (draw >= exclude.view(-1, 1))
    return draw + shift.long()


def entropy_over_classes(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the class axis (dim 1): ``Tensor[N]``."""
    logp = torch.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)


def strip_entropy(
    model: nn.Module,
    x: Tensor,
    clean_pool: Tensor,
    n: int = 100,
    generator: Optional[torch.Generator] = None,
    mode: str = "add",
    *,
    batch_size: int = 512,
    indices: Optional[Tensor] = None,
    exclude: Optional[Tensor] = None,
) -> Tensor:
    """STRIP score: minus the mean class-entropy of ``n`` superimposed copies of each input.

    Args:
        model: classifier returning logits ``[N, K]`` for pixel-space input.
        x: images ``[N, C, H, W]`` in ``[0, 1]``.
        clean_pool: clean images ``[P, C, H, W]`` in ``[0, 1]`` to superimpose (moved to ``x``'s device).
        n: overlays per input.
        generator: source of randomness for :func:`strip_overlay_indices` (the global RNG is
            never touched when one is given).
        mode: ``"add"`` (pixel-wise add, then clip to [0, 1]; original STRIP) or ``"average"``.
        batch_size: maximum number of superimposed images per forward pass.
        indices: optional precomputed ``[N, n]`` pool indices (overrides ``generator``).
        exclude: optional ``[N]`` pool index each input must not be blended with (``-1``: none);
            see :func:`strip_overlay_indices`.

    Returns:
        float ``Tensor[N]``: ``-mean_j H(softmax(f(blend(x_i, pool_j))))``; higher = more likely poisoned.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> g = torch.Generator().manual_seed(0)
        >>> strip_entropy(net, torch.rand(2, 3, 2, 2), torch.rand(8, 3, 2, 2), n=4, generator=g).shape
        torch.Size([2])
    """
    if mode not in STRIP_MODES:
        raise ValueError(f"mode must be one of {list(STRIP_MODES)}, got {mode!r}")
    check_positive_int(n, "n")
    check_positive_int(batch_size, "batch_size")
    if clean_pool.dim() != 4 or clean_pool.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"clean_pool must have shape [P, {', '.join(map(str, x.shape[1:]))}] like x, got {tuple(clean_pool.shape)}"
        )
    num = len(x)
    if num == 0:
        return torch.zeros(0, device=x.device)
    if indices is None:
        indices = strip_overlay_indices(num, len(clean_pool), n, generator, exclude=exclude)
    if indices.shape != (num, n):
        raise ValueError(f"indices must have shape ({num}, {n}), got {tuple(indices.shape)}")
    pool = clean_pool.to(x.device)
    flat_pool = indices.to(x.device).reshape(-1)
    flat_input = torch.arange(num, device=x.device).repeat_interleave(n)
    entropies = []
    with evaluating(model):
        for start in range(0, num * n, batch_size):
            sl = slice(start, start + batch_size)
            blended = superimpose(x[flat_input[sl]], pool[flat_pool[sl]], mode)
            logits = check_logits(model(blended))
            entropies.append(entropy_over_classes(logits))
    return -torch.cat(entropies).view(num, n).mean(dim=1)
