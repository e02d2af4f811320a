"""Small torch-only helpers shared by detectors, losses and callbacks (no Lightning imports)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


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


def split_batch(batch) -> Tuple[Tensor, Tensor | None]:
    """Return ``(x, y)`` from a batch that is a tensor, a tuple/list ``(x, y, ...)`` or a dict with ``x``/``y``
    (or ``image``/``label``) keys. ``y`` is None when the batch carries no labels."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict):
        for xk, yk in (("x", "y"), ("image", "label"), ("input", "target")):
            if xk in batch:
                return batch[xk], batch.get(yk)
        raise ValueError(f"cannot find images in a dict batch with keys {sorted(batch)}; expected 'x'/'y'")
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        return batch[0], (batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None)
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}; expected a Tensor, a tuple (x, y, ...) "
        "or a dict with 'x' and 'y'"
    )


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
