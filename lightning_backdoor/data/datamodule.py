"""``BackdoorDataModule``: poisoned training data and clean/poisoned evaluation loaders."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from .._validation import check_label, check_positive_int, check_probability
from ..attacks.base import Attack
from .datasets import DatasetSpec, get_spec
from .poisoned import CleanDataset, PoisonedDataset, dataset_labels


def _split_count(value: int | float, n: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int count or a float fraction in [0, 1), got {value!r}")
    if isinstance(value, float):
        if not 0 <= value < 1:
            raise ValueError(f"{name} as a fraction must be in [0, 1), got {value}")
        return int(round(value * n))
    if value < 0 or value >= n:
        raise ValueError(f"{name} must be in [0, {n - 1}] samples for a training set of {n}, got {value}")
    return value


class BackdoorDataModule(LightningDataModule):
    """Builds the loaders of a backdoor experiment from one dataset and one attack.

    Loaders:
        ``train_dataloader()``: the training split with a seeded ``rate`` share of the non-target
        samples poisoned (clean when ``attack`` is None). ``val_dataloader()`` /
        ``test_dataloader()``: ``[clean, poisoned]`` (index 0 = benign accuracy, 1 = attack
        success rate; the poisoned sets hold only samples whose true label is not ``target``).
        ``defense_dataloader()``: a small clean set held apart from training and evaluation, for
        fitting data-limited detectors. Every item is a :class:`~lightning_backdoor.data.Sample`
        ``(x, y, poisoned, original_y, index)``.

    Where the trigger sits: base image in ``[0, 1]`` -> trigger -> augmentation -> model (whose
    first layer is ``Normalize``). Evaluation sets are not augmented.

    Args:
        dataset: ``"mnist5k"`` (embedded, no download: the default), ``"mnist"``, ``"cifar10"``,
            ``"gtsrb"``, ``"imagenette"``, ``"tiny_imagenet"`` or ``"imagefolder"``.
        root: folder holding the dataset files (not needed for ``mnist5k``).
        attack: the trigger; ``None`` trains a clean model.
        target: the target label.
        rate: share of the non-target training samples to poison, in ``(0, 1]``.
        seed: seeds the splits and the poisoned index set.
        val_size: samples (int) or fraction (float) of the training split held out for validation.
        defense_size: clean samples held out of training for fitting detectors.
        test_size: test split size for ``mnist5k`` (other datasets have an official test split).
        batch_size / eval_batch_size: loader batch sizes (``eval_batch_size`` defaults to ``batch_size``).
        num_workers: DataLoader workers.
        augment: random crop (and flip where label-preserving) on the training set.
        download: let torchvision download missing files (needs internet).
        verify_integrity: check CIFAR-10 md5 sums (turn off for subsets written in the same format).
        image_size: resize for GTSRB/ImageFolder datasets (``None``: the dataset's default).

    Example:
        >>> from lightning_backdoor.attacks import BadNets
        >>> dm = BackdoorDataModule("mnist5k", attack=BadNets(), target=0, rate=0.1)
        >>> dm.setup("fit"); len(dm.train_set) > 0
        True
    """

    def __init__(
        self,
        dataset: str = "mnist5k",
        root: Optional[str] = None,
        attack: Optional[Attack] = None,
        target: int = 0,
        rate: float = 0.1,
        seed: int = 0,
        val_size: int | float = 500,
        defense_size: int = 200,
        test_size: int = 1000,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = False,
        verify_integrity: bool = True,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.spec: DatasetSpec = get_spec(dataset)
        if attack is not None and not isinstance(attack, Attack):
            raise TypeError(f"attack must be a lightning_backdoor.attacks.Attack or None, got {type(attack).__name__}")
        self.root, self.attack = root, attack
        self.target = int(target) if not isinstance(target, bool) else target
        self.rate = check_probability(rate, "rate", low_open=True)
        self.seed = int(seed)
        self.val_size, self.defense_size = val_size, check_positive_int(defense_size, "defense_size", allow_zero=True)
        self.test_size = check_positive_int(test_size, "test_size")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.eval_batch_size = check_positive_int(eval_batch_size or batch_size, "eval_batch_size")
        self.num_workers = check_positive_int(num_workers, "num_workers", allow_zero=True)
        self.augment, self.download, self.verify_integrity = augment, download, verify_integrity
        self.image_size = tuple(image_size) if image_size is not None else self.spec.image_size
        if self.spec.num_classes:
            check_label(self.target, "target", self.spec.num_classes)
        self.save_hyperparameters(ignore=["attack"])
        self._built = False
        self.num_classes: int = self.spec.num_classes

    # -- building --------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download:
            self.spec.load(root=self.root, download=True, image_size=self.image_size, seed=self.seed,
                           test_size=self.test_size, verify_integrity=self.verify_integrity)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._built:
            return
        train_full, test = self.spec.load(
            root=self.root, download=False, image_size=self.image_size, seed=self.seed,
            test_size=self.test_size, verify_integrity=self.verify_integrity,
        )
        if len(train_full) == 0 or len(test) == 0:
            raise ValueError(f"dataset {self.spec.name!r} has an empty split: train={len(train_full)}, test={len(test)}")
        labels = dataset_labels(train_full)
        if not self.spec.num_classes:
            self.num_classes = int(len(getattr(train_full, "dataset", train_full).classes)) if hasattr(
                getattr(train_full, "dataset", train_full), "classes") else int(labels.max()) + 1
            check_label(self.target, "target", self.num_classes)
        n = len(train_full)
        n_val = _split_count(self.val_size, n, "val_size")
        n_def = _split_count(self.defense_size, n - n_val, "defense_size")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, def_idx, train_idx = perm[:n_val], perm[n_val:n_val + n_def], perm[n_val + n_def:]
        train_idx = torch.sort(train_idx).values
        train_base = Subset(train_full, train_idx.tolist())
        train_labels = labels[train_idx]

        x0 = train_full[0][0]
        if self.attack is not None:
            self.attack.build(*x0.shape)
            if getattr(self.attack, "requires_fit", False):
                self.attack.fit(train_base, self.target)
        aug = self._augmentation(tuple(x0.shape[-2:])) if self.augment else None

        if self.attack is None:
            self.train_set: Dataset = CleanDataset(train_base, transform=aug)
        else:
            self.train_set = PoisonedDataset(train_base, self.attack, self.target, self.num_classes,
                                             self.rate, self.seed, "train", aug, labels=train_labels)
        val_base = Subset(train_full, torch.sort(val_idx).values.tolist())
        self.val_clean = CleanDataset(val_base)
        self.test_clean = CleanDataset(test)
        self.defense_set = CleanDataset(Subset(train_full, torch.sort(def_idx).values.tolist()))
        self.val_poisoned: Optional[Dataset] = None
        self.test_poisoned: Optional[Dataset] = None
        if self.attack is not None:
            if n_val:
                self.val_poisoned = PoisonedDataset(val_base, self.attack, self.target, self.num_classes,
                                                    1.0, self.seed, "test")
            self.test_poisoned = PoisonedDataset(test, self.attack, self.target, self.num_classes, 1.0, self.seed, "test")
        self._built = True

    def _augmentation(self, size: Tuple[int, int]):
        from torchvision.transforms import v2

        tfs: List[Any] = []
        if self.spec.crop_padding:
            tfs.append(v2.RandomCrop(list(size), padding=self.spec.crop_padding))
        if self.spec.flip:
            tfs.append(v2.RandomHorizontalFlip())
        return v2.Compose(tfs) if tfs else None

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, ds: Optional[Dataset], train: bool = False) -> DataLoader:
        if ds is None:
            raise RuntimeError("this loader is not available: no attack was given (clean training) or val_size=0")
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False,
        )

    def _ensure(self) -> None:
        if not self._built:
            self.setup()

    def train_dataloader(self) -> DataLoader:
        self._ensure()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> List[DataLoader]:
        self._ensure()
        sets = [self.val_clean] + ([self.val_poisoned] if self.val_poisoned is not None else [])
        return [self._loader(s) for s in sets if len(s) > 0]

    def test_dataloader(self) -> List[DataLoader]:
        self._ensure()
        sets = [self.test_clean] + ([self.test_poisoned] if self.test_poisoned is not None else [])
        return [self._loader(s) for s in sets]

    def eval_dataloaders(self, stage: str) -> Tuple[DataLoader, Optional[DataLoader]]:
        """``(clean, poisoned)`` loaders of ``stage`` (``"validate"``/``"val"`` or ``"test"``)."""
        self._ensure()
        clean, poisoned = (self.val_clean, self.val_poisoned) if stage in ("validate", "val") else (
            self.test_clean, self.test_poisoned)
        return self._loader(clean), (self._loader(poisoned) if poisoned is not None else None)

    def defense_dataloader(self) -> DataLoader:
        """Clean samples held apart from training and evaluation, for fitting detectors."""
        self._ensure()
        if len(self.defense_set) == 0:
            raise RuntimeError("defense_size=0: no held-apart clean samples to fit detectors on")
        return self._loader(self.defense_set)

    # -- metadata --------------------------------------------------------------------------------
    def backdoor_info(self) -> Dict[str, Any]:
        """Attack, parameters, poison rate, target and poisoned-set fingerprint, for run metadata."""
        self._ensure()
        info: Dict[str, Any] = {"dataset": self.spec.name, "num_classes": self.num_classes,
                                "train_size": len(self.train_set)}
        if isinstance(self.train_set, PoisonedDataset):
            info.update(self.train_set.info())
        else:
            info.update({"attack": None, "poison_rate": 0.0})
        return info

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"seed": self.seed, "target": self.target, "rate": self.rate,
                                 "dataset": self.spec.name}
        if self._built and isinstance(self.train_set, PoisonedDataset):
            state["poison_indices"] = self.train_set.poison_indices.clone()
            state["cover_indices"] = self.train_set.cover_indices.clone()
        if self.attack is not None:
            state["attack_state"] = {k: v.detach().cpu() for k, v in self.attack.state_dict().items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.attack is not None and "attack_state" in state:
            self.attack.load_state_dict(state["attack_state"])
        self._restored = state
