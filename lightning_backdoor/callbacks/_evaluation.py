"""Iterating evaluation sets from a callback: each sample once, split across DDP ranks, capped."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from ..batch import parse_batch
from ..utils import per_sample_normal, random_subset, subset_loader


def shard(loader: DataLoader, rank: int, world_size: int, max_samples: Optional[int],
          seed: int = 0) -> Tuple[DataLoader, Tensor]:
    """This rank's share of ``loader.dataset`` (capped at ``max_samples``), and their positions in it.

    The cap is a seeded random sample of the set (:func:`~lightning_backdoor.utils.random_subset`, the
    same on every rank), never its first samples: sets stored class by class would otherwise give a
    few classes only. Ranks then take interleaved positions ``rank, rank + world_size, ...`` of it with
    no padding, so every sample is evaluated exactly once across ranks (``DistributedSampler`` pads by
    repeating samples).
    """
    ds = getattr(loader, "dataset", None)
    if ds is None or not hasattr(ds, "__len__") or isinstance(ds, IterableDataset):
        raise TypeError(
            f"evaluation loaders must wrap a map-style dataset (with __len__), got {type(loader).__name__}"
            + (f" over {type(ds).__name__}" if ds is not None else "")
        )
    chosen = random_subset(len(ds), max_samples, seed)
    positions = chosen[rank::world_size]
    if world_size == 1 and len(chosen) == len(ds) and isinstance(getattr(loader, "sampler", None), SequentialSampler):
        return loader, positions
    return subset_loader(loader, positions), positions


def device_trigger(loader: Any, pl_module: Any, trainer: Any = None) -> Optional[Callable[[Tensor], Tensor]]:
    """The trigger to apply on the device to ``loader``'s batches, or None for sets poisoned in the data.

    The poisoned sets of a batch-level attack (:class:`~lightning_backdoor.data.DeviceTriggerSet`,
    ``triggers_on_device``) hold clean images: the *current* trigger of the module's ``batch_attack``
    (else the data module's attack) is applied to each batch on the device, in eval mode, no gradients.
    """
    ds = getattr(loader, "dataset", None)
    if not getattr(ds, "triggers_on_device", False):
        return None
    attack = getattr(pl_module, "batch_attack", None)
    if attack is None and trainer is not None:
        attack = getattr(getattr(trainer, "datamodule", None), "attack", None)
    if attack is None or not callable(getattr(attack, "trigger", None)):
        raise RuntimeError(f"the poisoned loader's {type(ds).__name__} needs its trigger applied on the device, but "
                           "neither the LightningModule (batch_attack) nor the data module (attack) holds a batch attack")
    return attack.trigger


def iter_batches(loader: DataLoader, positions: Tensor, device: torch.device,
                 transform: Optional[Callable[[Tensor], Tensor]] = None) -> Iterator[Tuple[Tensor, Optional[Tensor], Tensor]]:
    """Yield ``(x, original_y, positions)`` on ``device``; ``positions`` index the samples in the full set.

    The label is the batch's *true* label (``original_y``, or ``y`` for plain ``(x, y)`` batches).
    ``transform`` (e.g. :func:`device_trigger`) is applied to ``x`` on the device.
    """
    offset = 0
    for batch in loader:
        b = parse_batch(batch)
        x, y = b.x, b.original_y
        pos = positions[offset:offset + len(x)]
        offset += len(x)
        x = x.to(device)
        if transform is not None:
            x = transform(x)
        yield x, (y.to(device) if y is not None else None), pos


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


def is_last_eval_batch(trainer: Any, batch_idx: int, dataloader_idx: int) -> bool:
    """Whether ``(batch_idx, dataloader_idx)`` is the last batch of the last evaluation dataloader."""
    nums = trainer.num_test_batches if getattr(trainer, "testing", False) else trainer.num_val_batches
    if not nums:
        return False
    last = len(nums) - 1
    count = nums[last]
    if not isinstance(count, int) or count <= 0:  # inf (an iterable loader) or unknown: use epoch end
        return False
    return dataloader_idx == last and batch_idx == count - 1


class EvaluationEndHooks:
    """Mixin for callbacks that log once per validation/test epoch (``_should_run`` / ``_run`` implemented by them).

    The work runs at the **last batch of the last evaluation dataloader**, so what it logs lands in that
    dataloader's results only: Lightning copies metrics logged in ``on_*_epoch_end`` into the results of
    every dataloader, so with ``[benign, poisoned]`` loaders the test table would print each metric twice
    and ``trainer.test`` would return it twice. When batch counts are unknown (iterable loaders) or no
    batch runs, the work falls back to epoch end.
    """

    _done: bool = False

    def _should_run(self, trainer: Any, stage: str) -> bool:
        raise NotImplementedError

    def _run(self, trainer: Any, pl_module: Any, stage: str) -> None:
        raise NotImplementedError

    def _maybe(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self._done and not trainer.sanity_checking and self._should_run(trainer, stage):
            self._done = True
            self._run(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._done = False

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._done = False

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if is_last_eval_batch(trainer, batch_idx, dataloader_idx):
            self._maybe(trainer, pl_module, "validate")

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if is_last_eval_batch(trainer, batch_idx, dataloader_idx):
            self._maybe(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._maybe(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._maybe(trainer, pl_module, "test")


def log_once(pl_module: Any, values: dict) -> None:
    """Log already-global values (computed over every rank) from a callback hook."""
    for key, val in values.items():
        pl_module.log(key, val, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=False,
                      add_dataloader_idx=False, batch_size=1)
