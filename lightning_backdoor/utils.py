"""Small torch-only helpers shared by detectors, losses and callbacks (no Lightning imports)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer (float32 for a model without one)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextlib.contextmanager
def evaluating(model: nn.Module, *, grad: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (and no-grad unless ``grad``) and restore every submodule's mode after.

    Scoring must never change the caller's model mode: a model in train mode comes back in train
    mode, with a per-submodule restore so mixed modes (e.g. frozen BN) survive too.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Fork the global RNG(s) so randomness used inside does not shift the caller's random stream."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def per_sample_normal(x: Tensor, ids: Tensor, seed: int) -> Tensor:
    """Standard normal noise shaped like ``x``, each sample's drawn from a generator seeded by its id.

    The noise of a sample does not depend on the batch or the DDP rank it lands in, and the global
    RNG is untouched (used for the noise-augmented detection copies and ``asr@noise``).
    """
    noise = torch.empty(x.shape, dtype=x.dtype)
    for i, p in enumerate(ids.tolist()):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(p) + 1)
        noise[i] = torch.randn(x.shape[1:], generator=g, dtype=x.dtype)
    return noise.to(x.device)


def random_subset(n: int, k: int | None, seed: int = 0) -> Tensor:
    """Sorted positions of a seeded random sample of ``k`` out of ``n`` items (all of them when ``k`` is
    None or ``>= n``).

    Capped subsets are never "the first ``k``": datasets stored class by class (GTSRB, every
    ImageFolder) would then give one or two classes. The sample depends only on ``(n, k, seed)``
    (a local generator; the global RNG is untouched), so every DDP rank draws the same one.

    Example:
        >>> random_subset(10, 3, seed=0).tolist()
        [1, 4, 7]
    """
    if k is None or k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(n, generator=g)[:k]).values


def subset_loader(loader: "torch.utils.data.DataLoader", positions: Tensor) -> "torch.utils.data.DataLoader":
    """A loader over ``Subset(loader.dataset, positions)`` in that order, with the same batch size,
    collate function and workers (the original loader's sampler is not used)."""
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(loader.dataset, positions.tolist()), batch_size=loader.batch_size or 1, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)
