"""Poisoned datasets: which samples carry the trigger, and what each sample yields.

Pipeline of one training sample (documented in the README too)::

    base dataset  ->  image in pixel space [0, 1] (ToImage + ToDtype(scale=True), Resize if any)
                  ->  trigger (if the index is poisoned: the attack's train-time trigger, ``train_trigger``;
                      the cover variant if it is a cover sample; ``clean_train_transform`` otherwise)
                  ->  augmentation (random crop / flip, tensor transforms)
                  ->  model, whose first layer is Normalize

Evaluation sets (``mode="test"``) get the test-time trigger ``attack(x)``. Attacks with
``sample_seeded = True`` get a generator seeded from ``(seed, dataset index)`` for their random
draws, so a sample's training-time trigger is the same in every epoch and after a resume.

So the trigger is applied in pixel space *before* augmentation (a patch may move with a random
crop, as a physical trigger would) and *before* normalisation (which lives inside the model).

Each item is a :class:`Sample` ``(x, y, poisoned, original_y, index)``; ``y`` is the training label
(the target for dirty-label poisoned samples), ``original_y`` the true label. Loops that only want
``(x, y)`` can write ``x, y, *_ = batch``.
"""

from __future__ import annotations

import hashlib
from typing import Callable, List, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..validation import check_label, check_probability
from ..attacks.base import Attack


class Sample(NamedTuple):
    """One item (or, after collation, one batch) of a poisoned dataset."""

    x: Tensor
    y: Tensor | int
    poisoned: Tensor | bool
    original_y: Tensor | int
    index: Tensor | int


def dataset_labels(dataset: Dataset) -> Tensor:
    """All labels of ``dataset`` as a LongTensor, without loading images where the dataset allows it.

    Understands ``Subset`` (recursively), ``.targets`` (torchvision CIFAR/MNIST/ImageFolder),
    ``._samples`` (torchvision GTSRB) and ``.tensors`` (TensorDataset); otherwise iterates.
    """
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("targets", "labels"):
        t = getattr(dataset, attr, None)
        if t is not None and not callable(t):
            return torch.as_tensor(t, dtype=torch.long).reshape(-1)
    samples = getattr(dataset, "_samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return torch.as_tensor([s[1] for s in samples], dtype=torch.long)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) >= 2:
        return tensors[1].long().reshape(-1)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def select_poison_indices(
    labels: Tensor, target: int, rate: float, seed: int, *, dirty_label: bool = True
) -> Tensor:
    """Seeded choice of the poisoned indices: ``round(rate * len(labels))`` of the candidates (at least one).

    One convention for every attack, the field's: ``rate`` is the poisoned share of the **whole**
    training set. The poisoned samples are drawn from the samples whose label is not ``target``
    (dirty-label attacks, which relabel them) or is ``target`` (clean-label attacks, which keep
    labels). Returns a sorted LongTensor; the same ``(labels, target, rate, seed)`` always gives the
    same set, independent of the global RNG.

    Raises:
        ValueError: no candidates, or ``rate`` asks for more samples than there are candidates.
    """
    rate = check_probability(rate, "rate", low_open=True)
    candidates = torch.nonzero(labels != target if dirty_label else labels == target).flatten()
    kind = "non-target" if dirty_label else "target-class"
    if len(candidates) == 0:
        raise ValueError(
            f"dataset has no {kind} samples to poison for target={target}; labels present: "
            f"{sorted(set(labels.tolist()))[:20]}"
        )
    count = max(1, round(rate * len(labels)))
    if count > len(candidates):
        raise ValueError(
            f"rate={rate} asks for {count} poisoned samples ({rate:g} of the {len(labels)} training samples) but "
            f"only {len(candidates)} are {kind} samples for target={target}; the largest rate is "
            f"{len(candidates) / len(labels):.4g}"
        )
    g = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(len(candidates), generator=g)[:count]]
    return torch.sort(chosen).values


def stratified_split(labels: Tensor, sizes: Sequence[int], seed: int) -> List[Tensor]:
    """Split ``range(len(labels))`` into parts of the given ``sizes`` plus the rest, each stratified by class.

    Every part holds each class in (as nearly as integers allow) its share of the whole set, so a
    small defence or validation split of a dataset stored class by class still holds every class.
    Class quotas use the largest-remainder method; within a class the order is a seeded permutation.

    Returns:
        ``len(sizes) + 1`` sorted LongTensors (the last one: the remaining indices).

    Example:
        >>> labels = torch.tensor([0] * 6 + [1] * 4)
        >>> val, rest = stratified_split(labels, [5], seed=0)
        >>> torch.bincount(labels[val]).tolist(), len(rest)
        ([3, 2], 5)
    """
    n = len(labels)
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} must be >= 0 and sum to at most the {n} samples")
    g = torch.Generator().manual_seed(int(seed))
    members = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}
    members = {c: idx[torch.randperm(len(idx), generator=g)] for c, idx in members.items()}
    taken = {c: 0 for c in members}
    parts: List[Tensor] = []
    for size in sizes:
        remaining = {c: len(idx) - taken[c] for c, idx in members.items()}
        total = sum(remaining.values())
        if size == 0 or total == 0:
            parts.append(torch.empty(0, dtype=torch.long))
            continue
        exact = {c: size * r / total for c, r in remaining.items()}
        quota = {c: min(remaining[c], int(e)) for c, e in exact.items()}
        short = size - sum(quota.values())
        for c in sorted(exact, key=lambda c: (-(exact[c] - int(exact[c])), c)):
            if short <= 0:
                break
            if quota[c] < remaining[c]:
                quota[c] += 1
                short -= 1
        chosen = [members[c][taken[c]:taken[c] + quota[c]] for c in members]
        for c in members:
            taken[c] += quota[c]
        parts.append(torch.sort(torch.cat(chosen)).values)
    rest = [members[c][taken[c]:] for c in members]
    parts.append(torch.sort(torch.cat(rest)).values if rest else torch.empty(0, dtype=torch.long))
    return parts


def fingerprint(indices: Tensor) -> str:
    """A short stable hash of an index set (recorded with runs so two runs can be compared)."""
    data = torch.sort(indices.to(torch.int64).cpu()).values.numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class PoisonedDataset(Dataset):
    """Wraps a dataset of ``[0, 1]`` image tensors and poisons a seeded share of it.

    Args:
        dataset: yields ``(image, label)`` with images as float ``[C, H, W]`` tensors in ``[0, 1]``.
        attack: the trigger (an :class:`~lightning_backdoor.attacks.Attack`).
        target: the target label ``t``.
        num_classes: number of classes (to validate ``target``).
        rate: poisoned share of the whole training set, in ``(0, 1]`` (``mode="train"``), drawn from
            the non-target samples (dirty-label) or the target class (clean-label); see
            :func:`select_poison_indices`.
        seed: seeds the poisoned index set (and the cover set).
        mode: ``"train"`` poisons ``round(rate * len(dataset))`` samples (labels set to the target for
            dirty-label attacks; cover samples keep theirs); ``"test"`` keeps only
            samples whose true label is not the target, all triggered and labelled ``target``
            (the ASR set).
        transform: applied after the trigger (augmentation); ``None`` for evaluation sets.

    Example:
        >>> from lightning_backdoor.attacks import BadNets
        >>> ds = PoisonedDataset(clean, BadNets(), target=0, num_classes=10, rate=0.1)  # doctest: +SKIP
        >>> x, y, poisoned, original_y, index = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        dataset: Dataset,
        attack: Attack,
        target: int,
        num_classes: int,
        rate: float = 0.1,
        seed: int = 0,
        mode: str = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        labels: Tensor | None = None,
    ) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if not callable(attack):
            raise TypeError(f"attack must be an Attack (callable on images), got {type(attack).__name__}")
        self.target = check_label(target, "target", num_classes)
        self.rate = check_probability(rate, "rate", low_open=True)
        self.dataset, self.attack, self.num_classes = dataset, attack, num_classes
        self.seed, self.mode, self.transform = int(seed), mode, transform
        self.labels = dataset_labels(dataset) if labels is None else labels
        if len(self.labels) == 0:
            raise ValueError("dataset is empty (0 samples); cannot build a poisoned dataset")
        bad = (self.labels < 0) | (self.labels >= num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"dataset labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
                f"found {sorted(set(self.labels[bad].tolist()))[:10]}"
            )
        dirty = getattr(attack, "dirty_label", True)
        n = len(self.labels)
        if mode == "test":
            self.indices = torch.nonzero(self.labels != self.target).flatten()
            if len(self.indices) == 0:
                raise ValueError(f"dataset has no samples whose label is not the target {target}; "
                                 "the poisoned test set (ASR) would be empty")
            self.poison_indices = self.indices.clone()
            self.cover_indices = torch.empty(0, dtype=torch.long)
        else:
            self.indices = torch.arange(n)
            self.poison_indices = select_poison_indices(self.labels, self.target, self.rate, self.seed,
                                                        dirty_label=dirty)
            cover_ratio = float(getattr(attack, "cover_ratio", 0.0) or 0.0)
            self.cover_indices = self._select_cover(cover_ratio)
        self._poison_mask = torch.zeros(n, dtype=torch.bool)
        self._poison_mask[self.poison_indices] = True
        self._cover_mask = torch.zeros(n, dtype=torch.bool)
        self._cover_mask[self.cover_indices] = True
        self._relabel = dirty or mode == "test"
        # train-time trigger / clean-image hook (attacks/base.py): the test-time trigger and no hook by default
        self._train_time = mode == "train" and hasattr(attack, "train_trigger")
        self._clean_hook = mode == "train" and bool(getattr(attack, "transforms_clean_images", False))
        self._seeded = bool(getattr(attack, "sample_seeded", False))
        self._cache: Tensor | None = None
        if mode == "test" and getattr(attack, "per_sample", False):
            self._cache = self._precompute()

    def _sample_generator(self, index: int) -> torch.Generator | None:
        """Per-sample CPU generator seeded from ``(seed, index)`` for ``sample_seeded`` attacks, else None (global RNG)."""
        if not self._seeded:
            return None
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1))

    def refresh(self) -> None:
        """Recompute the batched per-sample triggers of an evaluation set (after the attack's state changed)."""
        if self._cache is not None:
            self._cache = self._precompute()

    def _precompute(self, batch_size: int = 256) -> Tensor:
        """Per-sample triggers of the whole evaluation set, computed in batches on the attack's work device.

        Stored as ``uint8`` (like the training-time poisoned images), in memory only.
        """
        device = self.attack._work_device() if hasattr(self.attack, "_work_device") else torch.device("cpu")
        out = []
        for start in range(0, len(self.indices), batch_size):
            part = self.indices[start:start + batch_size].tolist()
            xb = torch.stack([self.dataset[i][0] for i in part]).to(device)
            out.append((self.attack(xb).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        return torch.cat(out)

    def _select_cover(self, cover_ratio: float) -> Tensor:
        if cover_ratio <= 0:
            return torch.empty(0, dtype=torch.long)
        rest = torch.nonzero(~torch.isin(torch.arange(len(self.labels)), self.poison_indices)).flatten()
        # the field's convention (WaNet's noise mode): cover count = cross_ratio x number poisoned
        count = min(len(rest), round(cover_ratio * len(self.poison_indices)))
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.sort(rest[torch.randperm(len(rest), generator=g)[:count]]).values

    @property
    def fingerprint(self) -> str:
        """Hash of the poisoned index set (see :func:`fingerprint`)."""
        return fingerprint(self.poison_indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = int(self.indices[i])
        x, y = self.dataset[index][:2]
        y = int(y)
        poisoned = bool(self._poison_mask[index])
        if poisoned and self._cache is not None:
            x = self._cache[i].to(x.dtype) / 255.0
        elif poisoned and self.mode == "train" and getattr(self.attack, "per_sample", False):
            x = self.attack.poison_train(x, index)  # per-sample attacks: the image stored by fit
        elif poisoned:
            x = self.attack.train_trigger(x, self._sample_generator(index)) if self._train_time else self.attack(x)
        elif self._cover_mask[index]:
            x = self.attack.cover(x.unsqueeze(0), generator=self._sample_generator(index))[0]
        elif self._clean_hook:
            x = self.attack.clean_train_transform(x, self._sample_generator(index))
        if self.transform is not None:
            x = self.transform(x)
        label = self.target if poisoned and self._relabel else y
        return Sample(x, label, poisoned, y, index)

    def info(self) -> dict:
        """What to record with a run: attack, parameters, rate, target, poisoned-set fingerprint.

        Fitted attacks add ``attack_fit``: what their ``fit`` measured (surrogate training accuracy,
        the surrogate's attack success, ISSBA's bit accuracy).
        """
        attack_hp = self.attack.hparams() if hasattr(self.attack, "hparams") else {}
        return {
            "attack": getattr(self.attack, "name", type(self.attack).__name__),
            "attack_params": attack_hp,
            "poison_rate": self.rate,
            "target": self.target,
            "num_poisoned": int(len(self.poison_indices)),
            "num_cover": int(len(self.cover_indices)),
            "num_train": int(len(self.labels)),
            "poison_fingerprint": self.fingerprint,
            "poison_seed": self.seed,
            **({"attack_fit": dict(self.attack.fit_info)} if getattr(self.attack, "fit_info", None) else {}),
        }


class CleanDataset(Dataset):
    """A clean view yielding :class:`Sample` items (``poisoned=False``) so every loader has one format."""

    def __init__(self, dataset: Dataset, transform: Callable[[Tensor], Tensor] | None = None,
                 indices: Sequence[int] | Tensor | None = None) -> None:
        self.dataset, self.transform = dataset, transform
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = int(self.indices[i])
        x, y = self.dataset[index][:2]
        if self.transform is not None:
            x = self.transform(x)
        return Sample(x, int(y), False, int(y), index)


class DeviceTriggerSet(Dataset):
    """The poisoned evaluation (ASR) set of a batch-level attack: its trigger is applied on the device.

    Holds the samples whose true label is not ``target``, as clean images, each yielded as
    ``Sample(x_clean, target, True, true_label, index)``. Whoever evaluates it applies the attack's
    *current* trigger to the batch on the device (``BatchAttack.trigger``): the classifier's ASR,
    ``BackdoorMetrics`` and ``DetectionCallback`` do so when ``triggers_on_device`` is set.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = DeviceTriggerSet(TensorDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])), target=0,
        ...                       num_classes=3)
        >>> len(ds), ds[0].y, ds[0].original_y, ds[0].poisoned
        (2, 0, 1, True)
    """

    triggers_on_device = True

    def __init__(self, dataset: Dataset, target: int, num_classes: int, labels: Tensor | None = None) -> None:
        self.target = check_label(target, "target", num_classes)
        self.dataset = dataset
        labels = dataset_labels(dataset) if labels is None else labels
        self.indices = torch.nonzero(labels != self.target).flatten()
        if len(self.indices) == 0:
            raise ValueError(f"dataset has no samples whose label is not the target {target}; "
                             "the poisoned test set (ASR) would be empty")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sample:
        index = int(self.indices[i])
        x, y = self.dataset[index][:2]
        return Sample(x, self.target, True, int(y), index)
