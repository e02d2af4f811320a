"""Iterating evaluation sets from a callback: each sample once, split across DDP ranks, capped."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..utils import per_sample_normal, split_batch


def shard(loader: DataLoader, rank: int, world_size: int, max_samples: Optional[int]) -> Tuple[DataLoader, Tensor]:
    """This rank's share of the first ``max_samples`` samples of ``loader.dataset``, and their positions.

    Ranks take interleaved positions ``rank, rank + world_size, ...`` with no padding, so every
    sample is evaluated exactly once across ranks (``DistributedSampler`` pads by repeating samples).
    """
    ds = getattr(loader, "dataset", None)
    if ds is None or not hasattr(ds, "__len__"):
        raise TypeError(
            f"evaluation loaders must wrap a map-style dataset (with __len__), got {type(loader).__name__}"
        )
    n = len(ds) if max_samples is None else min(len(ds), max_samples)
    positions = torch.arange(rank, n, world_size)
    if world_size == 1 and n == len(ds) and getattr(loader, "sampler", None).__class__.__name__ == "SequentialSampler":
        return loader, positions
    sub = DataLoader(Subset(ds, positions.tolist()), batch_size=loader.batch_size or 1, shuffle=False,
                     num_workers=loader.num_workers, collate_fn=loader.collate_fn)
    return sub, positions


def iter_batches(loader: DataLoader, positions: Tensor, device: torch.device) -> Iterator[Tuple[Tensor, Optional[Tensor], Tensor]]:
    """Yield ``(x, y, positions)`` on ``device``; ``positions`` index the samples in the full set."""
    offset = 0
    for batch in loader:
        x, y = split_batch(batch)
        pos = positions[offset:offset + len(x)]
        offset += len(x)
        yield x.to(device), (y.to(device) if y is not None else None), pos


def per_sample_noise(x: Tensor, positions: Tensor, magnitude: float, seed: int) -> Tensor:
    """``clip(x + magnitude * N(0, 1))`` with each sample's noise seeded by its position, so the noisy copy
    of a sample is the same whichever rank (or batch) it lands in; the global RNG is untouched."""
    return (x + magnitude * per_sample_normal(x, positions, seed)).clamp_(0.0, 1.0)


def sample_ids(set_id: int, positions: Tensor) -> Tensor:
    """Ids of samples for detectors with per-sample randomness: distinct across the benign (0) and
    poisoned (1) sets, and the same whichever rank or batch a sample lands in."""
    return positions.long() + int(set_id) * (1 << 40)


def rank_and_world(trainer: Any) -> Tuple[int, int]:
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))
