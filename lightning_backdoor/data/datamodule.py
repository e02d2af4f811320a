"""``BackdoorDataModule``: poisoned training data and clean/poisoned evaluation loaders."""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, SequentialSampler, Subset

from ..validation import check_label, check_positive_int, check_probability, warn_ignored
from ..attacks.base import Attack
from ..attacks.batch_base import BatchAttack
from ..sanitizers.base import Sanitizer
from .datasets import DatasetSpec, get_spec
from .loaders import ResumableDataLoader, capture_rng, eval_sampler, restore_rng
from .poisoned import CleanDataset, DeviceTriggerSet, PoisonedDataset, dataset_labels, fingerprint, stratified_split
from .sanitize import Sanitization, remove_samples, sanitize_training_set

#: Bumped when the meaning of :meth:`BackdoorDataModule.state_dict` changes. Version 3: stratified
#: validation/defence splits and the poison rate as a share of the whole training set.
STATE_VERSION = 3


class CheckpointMismatchError(ValueError):
    """A checkpoint's recorded poisoned set or settings do not match the data rebuilt from it."""


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

    Distributed: the training loader is a :class:`~lightning_backdoor.data.loaders.ResumableDataLoader`
    (seeded per-epoch order, sharded by rank); under DDP the validation/test loaders give each rank
    an interleaved share with **no padding**, so BA/ASR count every sample exactly once.

    Checkpoints: ``state_dict()`` (saved by Lightning in every checkpoint) records the dataset,
    seed, target, rate, the poisoned and cover index sets, a fingerprint of the poisoned test set,
    the attack's name, parameters and buffers (patch, warping field) and the global RNG states.
    ``load_state_dict`` restores the attack buffers and (when fitting) the RNG states, and checks
    that the poisoned sets rebuilt from the current data equal the recorded ones, raising
    :class:`CheckpointMismatchError` otherwise. :meth:`from_checkpoint` rebuilds the data module,
    and so the poisoned test set, from a checkpoint file alone.

    Sanitisation (docs/sanitizers.md): with a ``sanitizer``, ``setup`` computes every training
    sample's features (trigger applied, no augmentation), lets the sanitiser decide (oracle
    sanitisers fit on the held-apart clean ``defense_set``) and removes the flagged samples from
    ``train_set`` before any loader is built. :attr:`sanitization` holds the removed positions, the
    scores and the removal metrics (:meth:`sanitizer_metrics`: ``train/sanitiser/precision``,
    ``/recall``, ``/auroc``, ``/removed``, ``/clean_removed``, logged by ``BackdoorClassifier`` at
    fit start). The removed set is recorded in ``state_dict``: a resumed fit must remove exactly
    the same samples (else :class:`CheckpointMismatchError`), and :meth:`from_checkpoint` removes
    the recorded ones.

    Args:
        dataset: ``"mnist5k"`` (embedded, no download: the default), ``"mnist"``, ``"cifar10"``,
            ``"gtsrb"``, ``"imagenette"``, ``"tiny_imagenet"`` or ``"imagefolder"``.
        root: folder holding the dataset files (not needed for ``mnist5k``).
        attack: the trigger; ``None`` trains a clean model. A batch-level attack
            (:class:`~lightning_backdoor.attacks.BatchAttack`, e.g. IAD) leaves the training set clean
            (``BackdoorClassifier`` poisons each batch on the device and trains the attack with the
            classifier) and makes the poisoned evaluation sets :class:`~lightning_backdoor.data.DeviceTriggerSet`
            (clean non-target images; the current trigger is applied on the device when evaluated);
            ``rate`` is then unused (the attack's own shares decide).
        target: the target label.
        rate: poisoned share of the whole training set, in ``(0, 1]`` (the field's convention; the
            poisoned samples are drawn from the non-target samples, or from the target class for
            clean-label attacks). The poisoned and cover counts are recorded with the run.
        seed: seeds the splits and the poisoned index set.
        val_size: samples (int) or fraction (float) of the training split held out for validation
            (stratified by class).
        defense_size: clean samples held out of training for fitting detectors (stratified by class,
            so data-limited detectors see every class; ≈100 per class in the paper-scale configs).
        test_size: test split size for ``mnist5k`` (other datasets have an official test split).
        batch_size / eval_batch_size: loader batch sizes (``eval_batch_size`` defaults to ``batch_size``).
        num_workers: DataLoader workers.
        augment: random crop (and flip where label-preserving) on the training set.
        download: let torchvision download missing files (needs internet).
        verify_integrity: check CIFAR-10 md5 sums (turn off for subsets written in the same format).
        image_size: resize for GTSRB/ImageFolder datasets (``None``: the dataset's default).
        sanitizer: a :class:`~lightning_backdoor.sanitizers.Sanitizer` applied to the training set
            before training (``None``: train on all of it).

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
        attack: Optional[Union[Attack, BatchAttack]] = None,
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
        sanitizer: Optional[Sanitizer] = None,
    ) -> None:
        super().__init__()
        self.spec: DatasetSpec = get_spec(dataset)
        if attack is not None and not isinstance(attack, (Attack, BatchAttack)):
            raise TypeError(f"attack must be a lightning_backdoor.attacks.Attack, a BatchAttack (e.g. IAD) or None, got "
                            f"{type(attack).__name__}")
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
        if attack is None and (rate != 0.1 or target != 0):
            warn_ignored("BackdoorDataModule", "rate/target", (rate, target), "attack=None trains a clean model "
                         "(pass attack= to poison the training set)")
        if sanitizer is not None and not isinstance(sanitizer, Sanitizer):
            raise TypeError(f"sanitizer must be a lightning_backdoor.sanitizers.Sanitizer or None, got "
                            f"{type(sanitizer).__name__}")
        self.sanitizer = sanitizer
        self.sanitization: Optional[Sanitization] = None
        self._recorded_removal: Optional[Dict[str, Any]] = None  # set by from_checkpoint
        self.save_hyperparameters(ignore=["attack", "sanitizer"])
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
        # stratified by class: a small split of a dataset stored class by class still holds every class
        val_idx, def_idx, train_idx = stratified_split(labels, [n_val, n_def], self.seed)
        train_base = Subset(train_full, train_idx.tolist())
        train_labels = labels[train_idx]

        x0 = train_full[0][0]
        self._image_shape = tuple(x0.shape)
        self._val_base, self._test_base = Subset(train_full, val_idx.tolist()), test
        if isinstance(self.attack, BatchAttack):
            self.attack.build(*x0.shape)
        elif self.attack is not None:
            self.attack.build(*x0.shape)
        aug = self._augmentation(tuple(x0.shape[-2:])) if self.augment else None

        if self.attack is None or isinstance(self.attack, BatchAttack):
            self.train_set: Dataset = CleanDataset(train_base, transform=aug)
        else:
            self.train_set = PoisonedDataset(train_base, self.attack, self.target, self.num_classes,
                                             self.rate, self.seed, "train", aug, labels=train_labels)
            if getattr(self.attack, "requires_fit", False):
                # once, before any poisoned sample is read; per-sample attacks store these samples' images
                # (a no-op when the attack's fitted state was restored from a checkpoint)
                accepts = "indices" in inspect.signature(self.attack.fit).parameters
                self.attack.fit(train_base, self.target,
                                **({"indices": self.train_set.poison_indices} if accepts else {}))
                self.attack.build(*x0.shape)
        val_base = Subset(train_full, val_idx.tolist())
        self.val_clean = CleanDataset(val_base)
        self.test_clean = CleanDataset(test)
        self.defense_set = CleanDataset(Subset(train_full, def_idx.tolist()))
        self.val_poisoned: Optional[Dataset] = None
        self.test_poisoned: Optional[Dataset] = None
        if isinstance(self.attack, BatchAttack):
            self._device_trigger_sets()
        elif self.attack is not None:
            if n_val:
                self.val_poisoned = PoisonedDataset(val_base, self.attack, self.target, self.num_classes,
                                                    1.0, self.seed, "test")
            self.test_poisoned = PoisonedDataset(test, self.attack, self.target, self.num_classes, 1.0, self.seed, "test")
        self._sanitize()
        self._built = True
        pending = self.__dict__.pop("_pending_state", None)
        if pending is not None:
            self._verify(pending)

    def _device_trigger_sets(self) -> None:
        self.val_poisoned = DeviceTriggerSet(self._val_base, self.target, self.num_classes) if len(self._val_base) else None
        self.test_poisoned = DeviceTriggerSet(self._test_base, self.target, self.num_classes)

    def set_batch_attack(self, attack: BatchAttack) -> None:
        """Use ``attack`` (a batch attack owned by the LightningModule) for the poisoned evaluation sets.

        Called by ``BackdoorClassifier(batch_attack=...)`` in ``setup``; builds its generators for this
        data's image shape and makes the poisoned sets :class:`~lightning_backdoor.data.DeviceTriggerSet`.
        """
        if not isinstance(attack, BatchAttack):
            raise TypeError(f"attack must be a BatchAttack, got {type(attack).__name__}")
        if self.attack is not None and not isinstance(self.attack, BatchAttack):
            raise ValueError(f"this data module already poisons its training set with {self.attack.name!r}; a batch "
                             "attack needs a data module with attack=None")
        self.attack = attack
        if self._built:
            attack.build(*self._image_shape)
            self._device_trigger_sets()

    def set_eval_attack(self, attack: Attack) -> None:
        """Evaluate with ``attack`` without poisoning the training set (the trigger of a model-edit attack, SRA).

        Builds the poisoned validation/test sets with ``attack`` (the data must be set up); the training set
        stays as it is (clean). Recorded in ``state_dict`` like a training attack, without poisoned training
        indices, so ``from_checkpoint`` rebuilds the poisoned test set.
        """
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be a dataset-level lightning_backdoor.attacks.Attack, got {type(attack).__name__}")
        if self.attack is not None:
            raise ValueError(f"this data module already has the attack {getattr(self.attack, 'name', self.attack)!r}")
        self._ensure()
        self.attack = attack
        attack.build(*self._image_shape)
        self.val_poisoned = (PoisonedDataset(self._val_base, attack, self.target, self.num_classes, 1.0, self.seed,
                                             "test") if len(self._val_base) else None)
        self.test_poisoned = PoisonedDataset(self._test_base, attack, self.target, self.num_classes, 1.0, self.seed,
                                             "test")

    def _augmentation(self, size: Tuple[int, int]):
        from torchvision.transforms import v2

        tfs: List[Any] = []
        if self.spec.crop_padding:
            tfs.append(v2.RandomCrop(list(size), padding=self.spec.crop_padding))
        if self.spec.flip:
            tfs.append(v2.RandomHorizontalFlip())
        return v2.Compose(tfs) if tfs else None

    # -- sanitisation ----------------------------------------------------------------------------
    def _sanitize(self) -> None:
        """Remove what the sanitiser flags (or, rebuilt from a checkpoint, what it recorded) from ``train_set``."""
        if self.sanitizer is not None:
            self.sanitization = sanitize_training_set(
                self.train_set, self.sanitizer, self.defense_set, self.num_classes,
                poisoned_known=isinstance(self.train_set, PoisonedDataset), batch_size=self.eval_batch_size)
        elif self._recorded_removal is not None:
            rec = self._recorded_removal
            removed = torch.as_tensor(rec["sanitizer_removed"]).long()
            remove_samples(self.train_set, removed)
            self.sanitization = Sanitization(rec.get("sanitizer_name", "sanitizer"), removed, None,
                                             dict(rec.get("sanitizer_metrics") or {}))

    def sanitizer_metrics(self) -> Dict[str, float]:
        """``{"train/sanitiser/<metric>": value}`` of the sanitised training set (empty without a sanitiser)."""
        if self.sanitization is None:
            return {}
        return {f"train/sanitiser/{k}": float(v) for k, v in self.sanitization.metrics.items()}

    def _sanitizer_record(self) -> Dict[str, Any]:
        if self.sanitization is None:
            return {}
        record: Dict[str, Any] = {"sanitizer_name": self.sanitization.name,
                                  "sanitizer_removed": self.sanitization.removed.clone(),
                                  "sanitizer_metrics": {k: float(v) for k, v in self.sanitization.metrics.items()}}
        if self.sanitizer is not None:
            record["sanitizer_hparams"] = {k: v for k, v in self.sanitizer.hparams().items()
                                           if isinstance(v, (str, int, float, bool, list, type(None)))}
            record["sanitizer_state"] = self.sanitizer.state_dict()
        return record

    def _verify_sanitizer(self, state: Dict[str, Any]) -> None:
        saved = state.get("sanitizer_removed")
        mine = self.sanitization
        if saved is None and mine is None:
            return
        if saved is None:
            raise CheckpointMismatchError(
                f"the checkpoint was trained without a sanitiser but this data module's sanitiser {mine.name!r} "
                f"removes {len(mine.removed)} training samples; drop the sanitizer to resume this run")
        saved = torch.as_tensor(saved).long().cpu()
        if mine is None:
            raise CheckpointMismatchError(
                f"the checkpoint was trained on a sanitised training set ({len(saved)} samples removed by "
                f"{state.get('sanitizer_name')!r}) but this data module has no sanitizer; pass the same sanitizer "
                "(BackdoorDataModule.from_checkpoint restores the recorded removals from the file)")
        if not torch.equal(saved, mine.removed.cpu()):
            raise CheckpointMismatchError(
                f"the training samples removed by the sanitiser {mine.name!r} now ({len(mine.removed)} samples, "
                f"fingerprint {fingerprint(mine.removed)}) differ from the checkpoint's ({len(saved)} samples, "
                f"fingerprint {fingerprint(saved)}): another sanitiser, other settings or another feature model "
                "than the run's")

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, ds: Optional[Dataset], train: bool = False, shard: bool = True) -> DataLoader:
        if ds is None:
            raise RuntimeError("this loader is not available: no attack was given (clean training) or val_size=0")
        if len(ds) == 0:
            raise ValueError(f"cannot build a loader over an empty dataset ({type(ds).__name__} with 0 samples)")
        common = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if train:
            return ResumableDataLoader(ds, seed=self.seed, batch_size=self.batch_size, drop_last=False, **common)
        sampler = eval_sampler(ds) if shard else SequentialSampler(ds)
        return DataLoader(ds, batch_size=self.eval_batch_size, sampler=sampler, drop_last=False, **common)

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
        """``(clean, poisoned)`` loaders of ``stage`` (``"validate"``/``"val"`` or ``"test"``).

        The full sets in order on every rank (callbacks shard them themselves, without padding).
        """
        self._ensure()
        clean, poisoned = (self.val_clean, self.val_poisoned) if stage in ("validate", "val") else (
            self.test_clean, self.test_poisoned)
        return self._loader(clean, shard=False), (self._loader(poisoned, shard=False) if poisoned is not None else None)

    def defense_dataloader(self) -> DataLoader:
        """Clean samples held apart from training and evaluation, for fitting detectors.

        Never sharded: under DDP every rank reads all of them, so fitted detector state is identical.
        """
        self._ensure()
        if len(self.defense_set) == 0:
            raise RuntimeError("defense_size=0: no held-apart clean samples to fit detectors on")
        return self._loader(self.defense_set, shard=False)  # the same samples on every rank

    # -- metadata --------------------------------------------------------------------------------
    def backdoor_info(self) -> Dict[str, Any]:
        """Attack, parameters, poison rate, target and poisoned-set fingerprint, for run metadata."""
        self._ensure()
        info: Dict[str, Any] = {"dataset": self.spec.name, "num_classes": self.num_classes,
                                "train_size": len(self.train_set)}
        if isinstance(self.train_set, PoisonedDataset):
            info.update(self.train_set.info())
        elif isinstance(self.attack, BatchAttack):
            info.update({"attack": self.attack.name, "attack_params": self.attack.hparams(), "target": self.target,
                         "poisoned_on_device": True})
        else:
            info.update({"attack": None, "poison_rate": 0.0})
        if self.sanitization is not None:
            info["sanitizer"] = {"name": self.sanitization.name, "removed": int(len(self.sanitization.removed)),
                                 "removed_fingerprint": fingerprint(self.sanitization.removed),
                                 **({} if self.sanitizer is None else self.sanitizer.hparams())}
        return info

    def _attack_record(self) -> Dict[str, Any]:
        """What rebuilds the attack: registry name, constructor arguments, buffers."""
        assert self.attack is not None
        params = inspect.signature(type(self.attack).__init__).parameters
        hp = self.attack.hparams() if hasattr(self.attack, "hparams") else {}
        kwargs = {k: v for k, v in hp.items() if k in params and not isinstance(v, dict)}
        return {"attack_name": getattr(self.attack, "name", type(self.attack).__name__),
                "attack_kwargs": kwargs,
                "attack_kind": "batch" if isinstance(self.attack, BatchAttack) else "dataset",
                "attack_state": {k: v.detach().cpu() for k, v in self.attack.state_dict().items()}}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to rebuild and verify the poisoned sets (tensors and plain values only)."""
        state: Dict[str, Any] = {"version": STATE_VERSION, "seed": self.seed, "target": self.target, "rate": self.rate,
                                 "dataset": self.spec.name, "num_classes": self.num_classes,
                                 "test_size": self.test_size, "val_size": self.val_size,
                                 "defense_size": self.defense_size}
        if self._built and isinstance(self.train_set, PoisonedDataset):
            state["poison_indices"] = self.train_set.poison_indices.clone()
            state["cover_indices"] = self.train_set.cover_indices.clone()
        if self._built and isinstance(self.test_poisoned, (PoisonedDataset, DeviceTriggerSet)):
            state["test_poison_fingerprint"] = fingerprint(self.test_poisoned.indices)
            state["test_poison_count"] = int(len(self.test_poisoned))
        if self.attack is not None:
            state.update(self._attack_record())
        state.update(self._sanitizer_record())
        state["rng"] = capture_rng()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the attack buffers (and, when fitting, the global RNG states); verify the poisoned sets.

        Raises:
            CheckpointMismatchError: the checkpoint was written with another dataset, seed, target or
                rate, or the poisoned index sets rebuilt from the current data differ from the recorded
                ones (the data changed). Checked now if the data is built, else at the end of ``setup``.
        """
        self._check_settings(state)
        if self.attack is not None and "attack_state" in state:
            self.attack.load_state_dict(state["attack_state"])
            if self._built:  # per-sample evaluation triggers were computed with the state before the restore
                for ds in (self.val_poisoned, self.test_poisoned):
                    if isinstance(ds, PoisonedDataset):
                        ds.refresh()
        trainer = self._trainer_or_none()
        if "rng" in state and trainer is not None and getattr(trainer.state, "fn", None) == "fit":
            restore_rng(state["rng"])  # data order, augmentation and cover noise continue as uninterrupted
        if self._built:
            self._verify(state)
        else:
            self._pending_state = state

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def _check_settings(self, state: Dict[str, Any]) -> None:
        version = int(state.get("version", 1))
        if version != STATE_VERSION:
            raise CheckpointMismatchError(
                f"the checkpoint's data state has version {version} but this lightning_backdoor writes version "
                f"{STATE_VERSION} (version 3 made the validation/defence splits stratified and the poison rate a "
                "share of the whole training set), so its poisoned set cannot be rebuilt; retrain with this version")
        mine = {"dataset": self.spec.name, "seed": self.seed, "target": self.target, "rate": self.rate}
        for key in ("test_size", "val_size", "defense_size"):
            if key in state:
                mine[key] = getattr(self, key)
        diff = [f"{k}: checkpoint {state[k]!r} vs this data module {v!r}" for k, v in mine.items()
                if k in state and state[k] != v]
        if diff:
            raise CheckpointMismatchError(
                "the checkpoint was written by a BackdoorDataModule with other settings, so its poisoned set "
                "cannot be rebuilt here: " + "; ".join(diff) + ". Use the checkpoint's settings "
                "(BackdoorDataModule.from_checkpoint(path) reads them from the file)")
        if self.attack is not None and "attack_name" in state:
            name = getattr(self.attack, "name", type(self.attack).__name__)
            if state["attack_name"] != name:
                raise CheckpointMismatchError(f"the checkpoint was written with attack {state['attack_name']!r} "
                                              f"but this data module has attack {name!r}")

    def _verify(self, state: Dict[str, Any]) -> None:
        if "poison_indices" in state:
            if not isinstance(self.train_set, PoisonedDataset):
                raise CheckpointMismatchError("the checkpoint records poisoned training indices but this data module "
                                              "has no attack (clean training); pass the attack it was trained with")
            for key in ("poison_indices", "cover_indices"):
                saved, now = state.get(key), getattr(self.train_set, key)
                if saved is not None and not torch.equal(torch.as_tensor(saved).long().cpu(), now.cpu()):
                    raise CheckpointMismatchError(
                        f"the {key.replace('_', ' ')} rebuilt from the data ({len(now)} samples, fingerprint "
                        f"{fingerprint(now)}) differ from the checkpoint's ({len(saved)} samples, fingerprint "
                        f"{fingerprint(torch.as_tensor(saved))}): the training data changed since the checkpoint "
                        f"(other files under root={self.root!r}, another dataset version or order)")
        if "test_poison_fingerprint" in state and isinstance(self.test_poisoned, (PoisonedDataset, DeviceTriggerSet)):
            now = fingerprint(self.test_poisoned.indices)
            if now != state["test_poison_fingerprint"]:
                raise CheckpointMismatchError(
                    f"the poisoned test set rebuilt from the data ({len(self.test_poisoned)} samples, fingerprint "
                    f"{now}) differs from the checkpoint's ({state.get('test_poison_count')} samples, fingerprint "
                    f"{state['test_poison_fingerprint']}): the test data changed since the checkpoint")
        self._verify_sanitizer(state)

    # -- rebuilding from a checkpoint ------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, root: Optional[str] = None, **overrides: Any) -> "BackdoorDataModule":
        """Rebuild a run's data module (and so its poisoned test set) from a Lightning checkpoint alone.

        The file is read with ``torch.load(..., weights_only=True)`` (an unsafe file is refused). The
        data settings come from the checkpoint's ``datamodule_hyper_parameters``, the attack from
        the recorded attack name, arguments and buffers; the returned module is set up and its
        poisoned sets verified against the recorded indices and fingerprint.
        A batch-level attack (IAD) is rebuilt with its trained generators from the recorded state; its
        ``test_poisoned`` is then a :class:`~lightning_backdoor.data.DeviceTriggerSet` of clean images to
        pass through ``dm.attack.trigger(x)`` (on any device).
        A sanitised run's training set is rebuilt with the recorded removals (its sanitiser, which may
        need a feature model, is not rebuilt; pass ``sanitizer=...`` to recompute and verify them).

        Args:
            path: a checkpoint written while fitting with a ``BackdoorDataModule``.
            root: where the dataset files are on this machine (default: the recorded ``root``).
            **overrides: other constructor arguments to change, e.g. ``eval_batch_size=1000``;
                settings that decide the poisoned sets (dataset, seed, target, rate, split sizes)
                are still checked against the checkpoint.

        Example:
            >>> dm = BackdoorDataModule.from_checkpoint("checkpoints/last.ckpt")  # doctest: +SKIP
            >>> x, y, poisoned, original_y, index = dm.test_poisoned[0]  # doctest: +SKIP
        """
        from ..checkpoints import safe_load

        ckpt = safe_load(path)
        state = ckpt.get(cls.__qualname__) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            found = sorted(k for k in ckpt if isinstance(k, str)) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"checkpoint '{os.fspath(path)}' holds no {cls.__qualname__} state (was it written by "
                             f"trainer.fit with a {cls.__qualname__}?); found {found}")
        kwargs = dict(ckpt.get("datamodule_hyper_parameters") or {})
        kwargs.pop("_class_path", None)
        kwargs.pop("_instantiator", None)
        for key in ("dataset", "seed", "target", "rate"):
            kwargs.setdefault(key, state[key])
        if root is not None:
            kwargs["root"] = root
        if "attack_name" in state:
            from ..attacks import create_attack, create_batch_attack

            create = create_batch_attack if state.get("attack_kind") == "batch" else create_attack
            attack = create(state["attack_name"], **state.get("attack_kwargs", {}))
            attack.load_state_dict(state["attack_state"])
            kwargs["attack"] = attack
        kwargs.update(overrides)
        allowed = inspect.signature(cls.__init__).parameters
        dm = cls(**{k: v for k, v in kwargs.items() if k in allowed})
        if "sanitizer_removed" in state and dm.sanitizer is None:
            dm._recorded_removal = state  # the run's sanitised training set, without rebuilding its sanitiser
        dm.load_state_dict(state)
        dm.setup()
        return dm


def poisoned_test_set_from_checkpoint(path: str | os.PathLike, root: Optional[str] = None) -> Dataset:
    """The poisoned test set (ASR set) of the run that wrote ``path``; see :meth:`BackdoorDataModule.from_checkpoint`."""
    dm = BackdoorDataModule.from_checkpoint(path, root=root)
    if dm.test_poisoned is None:
        raise ValueError(f"checkpoint '{os.fspath(path)}' is from a clean run (no attack): it has no poisoned test set")
    return dm.test_poisoned
