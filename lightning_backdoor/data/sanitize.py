"""Applying a training-set sanitiser to a (poisoned) training set, for :class:`~lightning_backdoor.data.BackdoorDataModule`.

The sanitiser sees every training sample as the victim would store it — the trigger applied to the
poisoned ones, labels as given (the target for dirty-label poisoned samples), **no augmentation** —
in its feature space; oracle sanitisers fit on the data module's held-apart clean set
(``defense_size`` samples, stratified by class). The removed samples are identified by their
position in the training split (the ``index`` field of every :class:`~lightning_backdoor.data.Sample`).
See docs/sanitizers.md.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..sanitizers.base import Sanitizer
from ..sanitizers.features import extract_features
from ..sanitizers.functional import removal_metrics

#: Metric keys logged for a sanitised training set (``train/sanitiser/{key}``).
METRIC_KEYS = ("precision", "recall", "auroc", "removed", "clean_removed")


class Sanitization(NamedTuple):
    """What a sanitiser removed from a training set.

    Attributes:
        name: the sanitiser's registry name.
        removed: sorted int64 positions (``Sample.index``) of the removed training samples.
        scores: the outlier score of every training sample, ordered by position (None when restored
            from a checkpoint).
        metrics: :func:`~lightning_backdoor.sanitizers.functional.removal_metrics` against the truly
            poisoned samples (only ``removed``/``clean_removed`` for clean training).
    """

    name: str
    removed: Tensor
    scores: Optional[Tensor]
    metrics: Dict[str, float]


@contextlib.contextmanager
def _no_augmentation(dataset: Dataset) -> Iterator[Dataset]:
    """The dataset with its ``transform`` (training augmentation) switched off inside the block."""
    saved = getattr(dataset, "transform", None)
    if saved is not None:
        dataset.transform = None
    try:
        yield dataset
    finally:
        if saved is not None:
            dataset.transform = saved


def sanitize_training_set(train_set: Dataset, sanitizer: Sanitizer, clean_set: Optional[Dataset], num_classes: int,
                          *, poisoned_known: bool, batch_size: int = 256) -> Sanitization:
    """Run ``sanitizer`` over ``train_set`` (fitting on ``clean_set`` in oracle mode) and restrict it to the kept samples.

    ``train_set`` must be a :class:`~lightning_backdoor.data.PoisonedDataset` or
    :class:`~lightning_backdoor.data.CleanDataset` (their ``indices`` say which positions they yield);
    it is changed in place to yield only the kept samples, in the same order.
    """
    if not isinstance(sanitizer, Sanitizer):
        raise TypeError(f"sanitizer must be a lightning_backdoor.sanitizers.Sanitizer, got {type(sanitizer).__name__}")
    if sanitizer.mode == "oracle" and (clean_set is None or len(clean_set) == 0):
        raise ValueError(f"{type(sanitizer).__name__}(mode='oracle') fits on the data module's held-apart clean "
                         "set, but defense_size=0; set defense_size > 0 (>= 2 samples per class) or use mode='data'")
    with _no_augmentation(train_set):
        train = extract_features(train_set, sanitizer.features, batch_size=batch_size)
    clean = None
    if sanitizer.mode == "oracle":
        c = extract_features(clean_set, sanitizer.features, batch_size=batch_size)
        clean = (c.features, c.labels)
    result = sanitizer.sanitize(train.features, train.labels, clean=clean, num_classes=num_classes)
    order = torch.argsort(train.index)
    index, keep, scores = train.index[order], result.keep.cpu()[order], result.scores.detach().cpu()[order]
    poisoned = train.poisoned[order] if poisoned_known else None
    metrics = removal_metrics(~keep, scores, poisoned)
    removed = index[~keep]
    if len(removed) == len(index):
        raise ValueError(f"sanitizer {sanitizer.name!r} removed all {len(index)} training samples; check its radii "
                         "(percentile) and feature space")
    remove_samples(train_set, removed)
    return Sanitization(sanitizer.name, removed, scores, metrics)


def remove_samples(train_set: Dataset, removed: Tensor) -> None:
    """Restrict ``train_set`` (``PoisonedDataset``/``CleanDataset``) to the positions not in ``removed``."""
    indices = getattr(train_set, "indices", None)
    if not isinstance(indices, Tensor):
        raise TypeError(f"cannot remove samples from a {type(train_set).__name__}: expected a PoisonedDataset or "
                        "CleanDataset (with an 'indices' tensor)")
    removed = torch.as_tensor(removed, dtype=torch.long).cpu()
    unknown = removed[~torch.isin(removed, indices)]
    if len(unknown):
        raise ValueError(f"{len(unknown)} removed positions are not in the training set (e.g. {unknown[:5].tolist()}); "
                         f"it holds {len(indices)} samples")
    train_set.indices = indices[~torch.isin(indices, removed)]
