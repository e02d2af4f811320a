"""Loaders that keep their place: seeded per-epoch order, exact mid-epoch resume, un-padded DDP evaluation.

- :class:`ResumableDataLoader`: the training loader. Its order is a pure function of
  ``(seed, epoch)`` (a :class:`~torch.utils.data.DistributedSampler`, with one replica outside
  DDP), and it implements Lightning's ``state_dict`` / ``load_state_dict`` loader protocol, so a fit
  stopped after ``k`` batches of an epoch resumes with batch ``k + 1`` of the same order (the
  skipped batches are not loaded).
- :func:`eval_sampler`: an evaluation sampler that gives each DDP rank an interleaved share of the
  samples with no padding, so every sample is evaluated exactly once (Lightning's default
  ``DistributedSampler`` repeats samples when the set size is not divisible by the world size).
- :func:`capture_rng` / :func:`restore_rng`: the global RNG states (torch CPU, Python, NumPy) as
  tensors and plain values, loadable with ``torch.load(..., weights_only=True)``.

How exact a resume is: the data order, the poisoned/cover sets and the trigger are always exact.
Augmentation and WaNet cover noise draw from the global RNG while loading; the data module saves
and restores that state, which makes a single-process, ``num_workers=0`` resume bit-exact (tested).
With ``num_workers > 0`` worker seeds follow ``(seed, epoch)``, but skipping batches after a
mid-epoch resume changes which worker loads which batch, and under DDP the checkpoint holds rank
0's RNG state: there the remaining augmentation of the interrupted epoch draws other random numbers.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler


def dist_rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def eval_sampler(dataset: Dataset) -> Sampler:
    """Sequential order in one process; under DDP this rank's samples ``rank, rank + world, ...`` (no padding).

    Lightning leaves a loader alone when its sampler is already a ``DistributedSampler``, so the
    un-padded sampler survives ``use_distributed_sampler=True``.
    """
    rank, world = dist_rank_and_world()
    if world == 1:
        return SequentialSampler(dataset)
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


class _SkipFirst:
    """A batch-sampler view that drops the first ``skip`` batches (set only while a pass is being created)."""

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """A shuffling training ``DataLoader`` whose position survives a checkpoint.

    Order: a ``DistributedSampler(shuffle=True, seed=seed)`` (rank and world size from the process
    group when one is initialised, else one replica); Lightning calls its ``set_epoch`` every epoch.
    Worker seeds come from a generator reseeded from ``(seed, epoch)`` at each pass, so no draw is
    taken from the global RNG when an epoch starts.

    State (``state_dict()``): ``{"epoch", "batches", "seed"}`` — the epoch of the current pass and
    the batches handed out in it. ``load_state_dict`` makes the next pass use that epoch's order and
    start after those batches. Lightning stores this state for mid-epoch checkpoints and loads it
    when resuming mid-epoch.

    Args:
        dataset: a map-style dataset.
        seed: seeds the order (and worker seeds).
        **kwargs: other ``DataLoader`` arguments (``batch_size``, ``num_workers``, ...); ``shuffle``,
            ``sampler`` and ``batch_sampler`` are set here.

    Example:
        >>> loader = ResumableDataLoader(list(range(10)), seed=0, batch_size=4)
        >>> first = next(iter(loader)); state = loader.state_dict()
        >>> again = ResumableDataLoader(list(range(10)), seed=0, batch_size=4)
        >>> again.load_state_dict(state)
        >>> [b.tolist() for b in again] == [b.tolist() for b in list(loader)[1:]]
        True
    """

    def __init__(self, dataset: Dataset, seed: int = 0, drop_last: bool = False, **kwargs: Any) -> None:
        for key in ("shuffle", "sampler", "batch_sampler", "generator"):
            kwargs.pop(key, None)
        rank, world = dist_rank_and_world()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=int(seed),
                                     drop_last=drop_last)
        super().__init__(dataset, sampler=sampler, drop_last=drop_last, generator=torch.Generator(), **kwargs)
        self.seed = int(seed)
        self._batches = 0
        self._pending: Optional[Tuple[int, int]] = None

    @property
    def _index_sampler(self) -> Any:  # type: ignore[override]
        skipper = self.__dict__.get("_skipper")
        base = super()._index_sampler
        if skipper is None or skipper.batch_sampler is not base:
            skipper = _SkipFirst(base)
            self.__dict__["_skipper"] = skipper
        return skipper

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip = 0
        if self._pending is not None:
            epoch, skip = self._pending
            self._pending = None
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 1_000_003 + self._epoch())
        self._batches = skip
        skipper = self._index_sampler
        skipper.skip = skip  # read by every iter() of the index sampler while the pass is created
        try:
            it = super().__iter__()
        finally:
            skipper.skip = 0
        return self._counted(it)

    def _counted(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self._epoch(), "batches": int(self._batches), "seed": self.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("epoch", "batches"):
            if key not in state:
                raise ValueError(f"ResumableDataLoader state must hold {key!r}, got keys {sorted(state)}")
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']} but this loader has seed={self.seed}; "
                             "the data order would differ from the interrupted run")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # the saved pass was complete: the next one starts a new epoch
            epoch, batches = epoch + 1, 0
        self._pending = (epoch, batches)


# -- global RNG states ----------------------------------------------------------------------------
def capture_rng() -> Dict[str, Any]:
    """The global torch (CPU), Python and NumPy RNG states, as tensors and plain values."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": str(key), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["key"], s["keys"].numpy().astype(np.uint32), int(s["pos"]), int(s["has_gauss"]),
                             float(s["cached_gaussian"])))
